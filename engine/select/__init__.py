"""``select``: score every document of the pool, keep the best under a budget, write the subset.

``stage`` is the entry (``run_select``); ``scorers/`` holds what can score a document; ``budget``,
``noise`` (Gumbel-top-k), ``topk`` (exact, bounded) and ``writer`` are its parts (``parquet_output`` and
``megatron_output`` the other ``--output-format`` writers).
"""
