"""The mini-world: a small procedural world in which protection efficacy is measured on a CPU.

``world``: seeded portrait identities, 64x64 renders, captions, training / held-out files;
``identity``: the world's face recognition (identity embedder + face detector) for ISM and FDFR;
``train_vae`` / ``train_t2i``: its VAE and text-to-image model, trained from scratch. The build that
runs every stage is ``ldu_jax/jobs/build_world.py``; the calibration, ``ldu_jax/evaluate/calibrate.py``.
"""
import os

# The shipped models (``python -m ldu_jax.cli.build_world --install`` writes them): sd/ (a diffusers
# bundle: VAE, UNet, text encoder, tokenizer), shortcut/, identity/ and rho/ (orbax work dirs).
MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
