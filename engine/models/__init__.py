"""The language models every stage shares: presets of the Pythia family (and LLaMA-0.5B), how they are
built, and the pretraining checkpoints that ``eval`` and BLISS's ``--target`` read back."""
