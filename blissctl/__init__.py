"""blissctl: the command-line front of the ``engine`` library (one module per command)."""

from engine import __version__

__all__ = ["__version__"]
