"""Overlapped expert-parallel exchange (``parallel.overlap.OverlappedDispatcher``) on CPU, gloo.

2 processes: a layer on constructed assignments (with dropped copies, and with a rank that receives no rows from
the other) gives the plain ``AllToAllDispatcher`` outputs and gradients; whole EP models with top-k and hash routers
(with and without the per-forward split plan) give the logits, loss and gradients of one process. The slow test
runs 4 processes (3 rounds per exchange, rows from every source).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_gloo
from test_parallel import B, batch, build, check_ep_loss_and_grads, close

from moe_variants.model.experts import LoopExperts
from moe_variants.parallel import expert_parallel as P
from moe_variants.parallel.overlap import OverlappedDispatcher

E, D = 4, 8
IDS = {  # (T=4, K=2) per rank of 2; ranks hold experts {0, 1} and {2, 3}
    "mixed": [torch.tensor([[0, 1], [0, 2], [2, 3], [1, 3]]), torch.tensor([[3, 2], [1, 0], [0, 3], [2, 1]])],
    # rank 1 sends nothing to rank 0: rank 0's round 1 receives no rows (and returns none)
    "one_sided": [torch.tensor([[0, 1], [0, 2], [2, 3], [1, 3]]), torch.tensor([[3, 2], [2, 3], [3, 2], [2, 3]])],
}


def _layer(rank: int, world: int, dispatcher_cls: type, ids: torch.Tensor, keep: torch.Tensor | None):
    """One MoE layer (``Dispatcher.run``) on this rank's tokens: (output, [grad of x, weights, w13, w2])."""
    torch.manual_seed(0)
    full = LoopExperts(dim=D, hidden_dim=12, num_experts=E)
    full.reset_parameters(0.5)
    lo, hi = P.local_expert_range(E, world, rank)
    experts = LoopExperts(dim=D, hidden_dim=12, num_experts=hi - lo)
    with torch.no_grad():
        experts.w13.copy_(full.w13[lo:hi])
        experts.w2.copy_(full.w2[lo:hi])
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(ids.shape[0], D, generator=g, requires_grad=True)
    weights = torch.rand(ids.shape, generator=g).requires_grad_(True)
    out = dispatcher_cls(dist.group.WORLD, E).run(experts, x, ids, weights, keep_TK=keep)
    (out * torch.linspace(-1, 1, D)).sum().backward()
    return out.detach(), [x.grad, weights.grad, experts.w13.grad, experts.w2.grad]


@contextlib.contextmanager
def counting():
    """Counts all-to-alls of rows (floating point) and batches of point-to-point transfers: yields a dict."""
    n = {"row_all_to_all": 0, "p2p": 0}
    all_to_all_single, batch_isend_irecv = dist.all_to_all_single, dist.batch_isend_irecv

    def counted_all_to_all(output, input, *args, **kw):
        n["row_all_to_all"] += input.is_floating_point()
        return all_to_all_single(output, input, *args, **kw)

    def counted_batch(ops):
        n["p2p"] += 1
        return batch_isend_irecv(ops)

    dist.all_to_all_single, dist.batch_isend_irecv = counted_all_to_all, counted_batch
    try:
        yield n
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = all_to_all_single, batch_isend_irecv


def _check_layer(rank: int, world: int, ids: torch.Tensor, keep: torch.Tensor | None, what: str) -> None:
    ref_out, ref_grads = _layer(rank, world, P.AllToAllDispatcher, ids, keep)
    with counting() as n:
        out, grads = _layer(rank, world, OverlappedDispatcher, ids, keep)
    # rows travel point to point only; with 2 ranks: one round there and one back, in forward and in backward
    assert n["row_all_to_all"] == 0 and (n["p2p"] == 4 if world == 2 else n["p2p"] > 0), (what, n)
    close(out, ref_out, f"{what}: output")
    for name, g, want in zip(("x", "weights", "w13", "w2"), grads, ref_grads):
        close(g, want, f"{what}: grad of {name}")


def _check_model(rank: int, world: int, router: str, planned: bool) -> None:
    ids, labels = batch()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    ref = build(router)
    ref_logits = ref(ids).logits
    ref_loss = ref(ids, labels=labels).lm_loss
    ref_loss.backward()

    model = P.apply_expert_parallel(build(router), dispatcher=OverlappedDispatcher)
    if not planned:
        model.dispatch_planner = None
    what = f"{router}, planned={planned}"
    close(model(ids[rows]).logits, ref_logits[rows], f"{what}: logits")
    check_ep_loss_and_grads(model, ref, ref_loss, ids, labels, rank, world, what)


def _checks(rank: int, world: int) -> None:
    if world == 2:
        drop = torch.tensor([[True, True], [True, False], [True, True], [True, True]]) if rank == 0 else None
        for name, ids in IDS.items():
            _check_layer(rank, world, ids[rank], None, name)
            _check_layer(rank, world, ids[rank], drop, f"{name}, dropped copies")
    else:  # every rank receives rows from every source
        g = torch.Generator().manual_seed(rank)
        _check_layer(rank, world, torch.randint(0, E, (6, 2), generator=g), None, f"random ids, {world} ranks")
    for router, planned in (("topk", False), ("hash", True), ("hash", False)):
        _check_model(rank, world, router, planned)


def test_overlapped_dispatcher_matches_plain_and_one_process(tmp_path: Path):
    spawn_gloo(_checks, 2, tmp_path, 2)


@pytest.mark.slow
def test_overlapped_dispatcher_four_ranks(tmp_path: Path):
    spawn_gloo(_checks, 4, tmp_path, 4)


def test_overlap_config(tmp_path: Path):
    from test_parallel_lightning import compose_single

    from moe_variants.training.build import build as build_run

    ddp = ["parallel=ep", "+trainer.strategy=ddp", "trainer.devices=2"]
    r = build_run(compose_single(tmp_path / "a", *ddp, "parallel.overlap=true"))
    r.lock.unlink()
    assert r.lit.ep_dispatcher is OverlappedDispatcher
    with pytest.raises(ValueError, match=r"one_copy_per_rank=true and parallel.overlap=true .*set one of them"):
        build_run(compose_single(tmp_path / "b", *ddp, "parallel.overlap=true", "parallel.one_copy_per_rank=true"))
    assert not (tmp_path / "b" / ".running").exists()
