"""Load-balancing statistics over the data-parallel world (``load_balance_scope=global``).

With data parallelism every rank computes the load-balance aux loss from its own tokens: the mean over ranks of
``E * sum_e f_e * P_e`` is not the loss of one process on the global batch (a product of per-rank means is not
the mean of the products), and a rank's few tokens make ``f`` noisy. With a global scope the routers all-reduce
``f`` and ``P`` over the group before the product (``model.losses.global_balance_stats``): the loss, and after the
data-parallel gradient average its gradient, are those of one process on the global batch. Cost: one all-reduce
of 2E + 2 numbers per MoE layer per training forward. Under hybrid EP x DP the group is the whole world (every
rank holds its own tokens).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from moe_variants.model.routing import Router

SCOPES = ("local", "global")


def check_load_balance_scope(scope: Any) -> str:
    """``load_balance_scope`` as given, or a ``ValueError`` naming the choices."""
    if scope not in SCOPES:
        raise ValueError(
            f"load_balance_scope={scope!r}: choose 'local' (each process's tokens, the default) or 'global' "
            f"(statistics all-reduced over the data-parallel processes: the one-process loss on the global batch)"
        )
    return scope


def use_global_load_balance(model: nn.Module, group: Any = None) -> int:
    """Make every router of ``model`` compute its load-balance statistics over ``group`` (default: the world) in
    training. Returns the number of routers set. Every rank must then run the same number of training forwards
    (as data-parallel training does)."""
    group = group if group is not None else dist.group.WORLD
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for router in routers:
        router.load_balance_group = group
    return len(routers)
