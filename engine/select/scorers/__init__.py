"""What can score a document for ``select``: the interface (``base``) and each scorer in its own module."""
