"""``eval``: validation loss, perplexity and bits per byte of a checkpoint, and comparisons of subsets
by what they do to training."""
