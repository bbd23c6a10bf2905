"""Routers: one routing idea per file, each with one ``conf/router/<name>.yaml`` whose ``_target_`` points at it.

Owns: the router implementations (``topk``, ``hash``, ``span``), what only they need (word spans and span
hashing in ``spans``, corpus-derived tables in ``resources``) and the look-ahead audit every router must pass
(``audit``; its ``moe-audit`` app, which adds the tokenizer and the corpus, is ``training.audit``).

May import: ``moe_variants.model`` (the router contract and shared losses), ``moe_variants.paths``, torch.
"""
