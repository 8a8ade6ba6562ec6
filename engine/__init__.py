"""blissctl's library: data plane, models, bilevel training, scoring, selection, pretraining.

Each stage is a module with one entry function taking a frozen config dataclass and a run directory;
the CLI (``blissctl/``) only builds configs. Nothing here parses flags.
"""

__version__ = "0.1.0"
