"""Routers: one routing idea per class, each with one ``conf/router/<name>.yaml`` whose ``_target_`` points at it.

Owns: the router implementations (``topk``: Mixtral's learned gate, softmax or sigmoid scores; ``aux_free``:
DeepSeek-V3's bias balancing; ``hash``: token-id tables; ``span``: a learned gate held over word or fixed spans;
``span_vocab``: routing vocabularies keyed on a span's first piece, its prefix or, looking ahead, the whole word;
``expert_choice`` and ``balanced``: batch-wide assignments that look ahead), what they share (gate maths in
``gates``, expert tables and the per-layer seed in ``tables``), what only span routers need (word spans, span
hashing and held decisions in ``spans``), what routers are built from beyond their config (tokenizer and corpus
statistics in ``resources``) and the look-ahead audit every router must pass (``audit``; its ``moe-audit`` app,
which adds the tokenizer and the corpus, is ``training.audit``). Routers import the shared modules, never each
other (``aux_free`` extends ``topk``'s gate).

May import: ``moe_variants.model`` (the router contract and shared losses), ``moe_variants.paths``, torch.
"""
