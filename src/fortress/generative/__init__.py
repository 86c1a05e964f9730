"""Generative models shared by attacks and defenses (a neutral module below both families).

``fortress.generative.dfme`` holds DFME's image generator; import from the submodules.
"""
