"""Generative models and OOD image sources shared by attacks and defenses (a neutral layer below both)."""
