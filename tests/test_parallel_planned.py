"""One split-size exchange per forward (``parallel.expert_parallel.plan_dispatch``) on CPU: 2 processes (gloo).

For routers that route by token ids (a hash table with learned weights; a first-piece routing vocabulary, whose
decisions are held over word spans) under both all-to-all dispatchers: the planned forward's logits equal those of
the per-layer exchange exactly, and its loss and every gradient equal those of one process. Known answers for the
count exchanges (integer ``all_to_all_single`` with equal splits) and host syncs (``Tensor.tolist``) of a 3-layer
model: 3 per forward without the plan, 1 with it, also with activation checkpointing (the recomputation in backward
reuses the plan: 1 for forward and backward, against 6); 3 for a learned router, under capacity dropping and in
cached decoding.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import spawn_gloo
from test_parallel import WORLD, B, batch, check_ep_loss_and_grads, tiny_args

from moe_variants import Transformer
from moe_variants.parallel import expert_parallel as P
from moe_variants.parallel.dedup import OneCopyPerRankDispatcher
from moe_variants.routers.hash import HashRouter
from moe_variants.routers.resources import synthetic_resources
from moe_variants.routers.span_vocab import FirstPieceVocabRouter
from moe_variants.routers.topk import TopKRouter

LAYERS = 3
ROUTERS = {
    "hash": functools.partial(HashRouter, table="random", weights="learned"),
    "first_piece": functools.partial(FirstPieceVocabRouter, vocab_size=16, num_buckets=8,
                                     resources=synthetic_resources(128)),
    "topk": TopKRouter,
}


def build(router: str, **kw) -> Transformer:
    torch.manual_seed(0)
    checkpointing = kw.pop("activation_checkpointing", False)
    # loop experts: the EP tests' default (grouped experts on CPU under gloo made some processes abort at exit,
    # after every check had passed); their tokens_per_expert.tolist() is not a dispatch sync (see counting)
    return Transformer(tiny_args(n_layers=LAYERS, **kw), router=ROUTERS[router], experts="loop",
                       activation_checkpointing=checkpointing)


def ep(model: Transformer, dispatcher: type = P.AllToAllDispatcher, planned: bool = True) -> Transformer:
    P.apply_expert_parallel(model, dispatcher=dispatcher)
    if not planned:
        model.dispatch_planner = None  # one count exchange per layer, as without plan_dispatch
    return model


DISPATCH_MODULES = ("moe_variants.parallel.expert_parallel", "moe_variants.parallel.dedup")


@contextlib.contextmanager
def counting():
    """Counts count exchanges (integer all_to_all_single with equal splits: not the rows, not the one-copy
    dispatcher's expert ids) and the dispatchers' host syncs (Tensor.tolist called from them) while it is open:
    yields a dict."""
    n = {"exchanges": 0, "syncs": 0}
    all_to_all_single, tolist = dist.all_to_all_single, torch.Tensor.tolist

    def counted_all_to_all(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        n["exchanges"] += output_split_sizes is None and not input.is_floating_point()
        return all_to_all_single(output, input, output_split_sizes, input_split_sizes, **kw)

    def counted_tolist(self):
        n["syncs"] += sys._getframe(1).f_globals["__name__"] in DISPATCH_MODULES  # the dispatchers' syncs only
        return tolist(self)

    dist.all_to_all_single, torch.Tensor.tolist = counted_all_to_all, counted_tolist
    try:
        yield n
    finally:
        dist.all_to_all_single, torch.Tensor.tolist = all_to_all_single, tolist


def _check_planned(rank: int, router: str, dispatcher: type) -> None:
    ids, labels = batch()
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    ref = build(router)
    ref_loss = ref(ids, labels=labels).lm_loss
    ref_loss.backward()

    what = f"{router}, {dispatcher.__name__}"
    model, per_layer = ep(build(router), dispatcher), ep(build(router), dispatcher, planned=False)
    with counting() as n:
        logits = model(ids[rows]).logits
    assert n == {"exchanges": 1, "syncs": 1}, (what, n)
    with counting() as n:
        want = per_layer(ids[rows]).logits
    assert n == {"exchanges": LAYERS, "syncs": LAYERS}, (what, n)
    assert torch.equal(logits, want), what

    check_ep_loss_and_grads(model, ref, ref_loss, ids, labels, rank, WORLD, what)


def _check_fallbacks(rank: int) -> None:
    ids, labels = batch()
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    # activation checkpointing: the recomputation in backward dispatches with the forward's plan
    for planned, want in ((True, 1), (False, 2 * LAYERS)):
        model = ep(build("hash", activation_checkpointing=True), planned=planned)
        with counting() as n:
            model(ids[rows], labels=labels[rows]).lm_loss.backward()
        assert n == {"exchanges": want, "syncs": want}, ("checkpointing", planned, n)
    # a learned router, capacity dropping, cached decoding: one exchange per layer
    capacity = build("hash", capacity_factor=1.0, allow_lookahead=True)
    for model, cached in ((ep(build("topk")), False), (ep(capacity), False), (ep(build("first_piece")), True)):
        with counting() as n:
            model(ids[rows], cache=model.new_cache() if cached else None)
        assert n == {"exchanges": LAYERS, "syncs": LAYERS}, (model.routers[0].describe(), n)


def _checks(rank: int) -> None:
    for router in ("hash", "first_piece"):
        for dispatcher in (P.AllToAllDispatcher, OneCopyPerRankDispatcher):
            _check_planned(rank, router, dispatcher)
    _check_fallbacks(rank)


def test_one_count_exchange_per_forward_for_token_id_routers(tmp_path: Path):
    spawn_gloo(_checks, WORLD, tmp_path)
