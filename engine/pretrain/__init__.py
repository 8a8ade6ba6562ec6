"""``pretrain``: the launcher (``launch``) that prepares data and starts ``torchrun``, and the trainer
(``train``) that every rank runs (``worker`` is the process torchrun starts)."""
