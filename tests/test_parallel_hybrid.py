"""Hybrid expert x data parallelism on CPU: 4 processes (gloo) against one process on the whole batch.

One spawn of 4 ranks (1 sequence each, the global batch of ``test_parallel``) runs every layout of a 4-process
world: EP 4 (experts over the whole world), EP 2 x DP 2 (EP groups {0,1} {2,3}, replicas {0,2} {1,3}) and EP 1 x
DP 4 (plain data parallelism). For each: the groups are the documented ones, the mean loss and every gradient after
``sync_expert_parallel_grads`` equal the one-process ones, one SGD step keeps the models equal, and the state dict
gathered within an EP group is the full one-process state on every rank (replicas included), which loads into the
other layouts with the same logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from conftest import spawn_gloo
from test_parallel import B, batch, build, close

from moe_variants.parallel import expert_parallel as P

WORLD = 4
LAYOUTS = (4, 2, 1)  # EP size M; data-parallel replicas D = WORLD / M


def _layout_model(router: str, experts: str, ep_size: int):
    """(model of this rank for EP size ``ep_size``, EP group, replica group, EP rank)."""
    group, replicas = P.expert_parallel_groups(ep_size)
    model = build(router, experts)
    if ep_size > 1:
        P.apply_expert_parallel(model, group)
    return model, group, replicas, dist.get_rank(group)


def _check_layout(rank: int, ep_size: int, router: str, experts: str) -> dict[str, torch.Tensor]:
    ids, labels = batch()
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)

    ref = build(router, experts)
    ref_loss = ref(ids, labels=labels).lm_loss
    ref_loss.backward()

    model, group, replicas, ep_rank = _layout_model(router, experts, ep_size)
    first = rank // ep_size * ep_size
    assert dist.get_process_group_ranks(group) == list(range(first, first + ep_size)), (ep_size, rank)
    if ep_size < WORLD:
        assert dist.get_process_group_ranks(replicas) == list(range(rank % ep_size, WORLD, ep_size))
    else:
        assert replicas is None
    assert ep_rank == rank % ep_size

    loss = model(ids[rows], labels=labels[rows]).lm_loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    close(mean_loss / WORLD, ref_loss.detach(), f"EP {ep_size}: loss")

    P.sync_expert_parallel_grads(model, expert_replica_group=replicas)
    lo, hi = P.local_expert_range(4, ep_size, ep_rank)
    expert_names = set(P.expert_parameter_names(model))
    assert bool(expert_names) == (ep_size > 1)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        close(p.grad, want[lo:hi] if name in expert_names else want, f"EP {ep_size}: grad of {name}")

    for m in (ref, model):
        for p in m.parameters():
            p.data.add_(p.grad, alpha=-0.1)
    full = P.gather_state_dict(model)  # within the EP group: every replica gets the whole model
    for k, v in ref.state_dict().items():
        if isinstance(v, torch.Tensor):
            close(full[k], v, f"EP {ep_size}: gathered {k}")
    return full


def _check_reshard(rank: int, full: dict[str, torch.Tensor], router: str, experts: str) -> None:
    """A full state dict gathered under one layout loads into every layout with the one-process logits."""
    ids, _ = batch()
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    single = build(router, experts)
    P.load_state_dict_resharded(single, full)
    want = single(ids).logits[rows]
    for ep_size in LAYOUTS:
        model = _layout_model(router, experts, ep_size)[0]
        P.load_state_dict_resharded(model, full)
        close(model(ids[rows]).logits, want, f"reloaded into EP {ep_size}: logits")


def _checks(rank: int) -> None:
    full = {ep: _check_layout(rank, ep, "topk", "loop") for ep in LAYOUTS}
    _check_layout(rank, 2, "hash", "grouped")
    _check_reshard(rank, full[2], "topk", "loop")  # EP 2 x DP 2 -> EP 4, EP 2 x DP 2, one process
    try:
        P.expert_parallel_groups(3)
    except ValueError as e:
        assert "does not divide the 4 processes" in str(e) and "[1, 2, 4]" in str(e), e
    else:
        raise AssertionError("an EP size not dividing the world did not fail")


def test_hybrid_layouts_match_single_process(tmp_path: Path):
    spawn_gloo(_checks, WORLD, tmp_path)
