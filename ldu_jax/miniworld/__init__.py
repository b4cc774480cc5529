"""The mini-world: a small procedural world in which protection efficacy is measured on a CPU.

``world``: seeded portrait identities, 64x64 renders, captions, training / held-out files;
``identity``: the world's face recognition (identity embedder + face detector) for ISM and FDFR.
"""
