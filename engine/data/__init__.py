"""Reading and tokenising: the first two steps of the flow (``read → tokenize``).

``sources`` finds input shards and turns their lines into documents (bad lines skipped and counted),
``workers`` runs that and the tokenizer in reader processes for ``select``, ``tokenizer`` loads or
trains the run's tokenizer, ``packing`` packs documents into one memory-mapped token file for
``pretrain``, ``collate`` pads token lists into model batches; ``sample`` is the embedded corpus.
"""
