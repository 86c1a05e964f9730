"""Generative models and OOD image sources shared by attacks and defenses (a neutral layer below both).

``dfme`` holds DFME's image generator, ``dcgan`` the DCGAN (DNF's OOD generator, DFMS-HL's proxy
generator), ``ood`` DNF's OOD training sources; import from the submodules.
"""
