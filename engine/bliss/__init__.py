"""BLISS itself (``../shared/BLISS.md``): the bilevel math, the score model and ``train-scorer``."""
