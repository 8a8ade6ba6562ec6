"""Reading and tokenising: the first two steps of the flow (``read → tokenize``).

``formats`` is the one table of what is read and written, ``locations`` opens a local path or a URL
(fsspec), ``columnar`` reads parquet and Arrow rows, ``megatron`` is the Megatron/GPT-NeoX indexed
dataset; ``sources`` finds input shards and turns their lines (or rows) into documents (bad ones
skipped and counted),
``workers`` runs that and the tokenizer in reader processes for ``select``, ``tokenizer`` loads or
trains the run's tokenizer, ``packing`` packs documents into one memory-mapped token file for
``pretrain``, ``collate`` pads token lists into model batches; ``sample`` is the embedded corpus.
"""
