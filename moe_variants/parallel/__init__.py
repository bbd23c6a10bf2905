"""Expert parallelism: experts sharded over ranks, tokens exchanged by all-to-all.

Owns: the expert-parallel dispatchers and their collectives (with the per-forward split plan for routers that route
by token ids), sharding and gathering of expert tensors for checkpoints (``expert_parallel``), the exchange
overlapped with the expert compute (``overlap``), the Lightning hooks that wire it into a run (``lightning``), and
load-balancing statistics over the data-parallel world (``load_balance``).

May import: torch (``torch.distributed``), ``moe_variants.model``; Lightning only in ``lightning``.
"""
