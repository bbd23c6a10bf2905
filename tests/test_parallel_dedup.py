"""One copy per destination rank (``parallel.dedup.OneCopyPerRankDispatcher``) on CPU: 2 processes (gloo).

Known answers for a constructed assignment (8 experts' worth of copies, 6 rows sent where the copy-per-expert
dispatcher sends 8), with and without dropped copies; the same outputs and gradients as ``AllToAllDispatcher``
(layer level, and a whole EP model against one process).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from conftest import spawn_gloo
from test_parallel import batch, build, check_ep_loss_and_grads, close

from moe_variants.model.experts import LoopExperts
from moe_variants.parallel import expert_parallel as P
from moe_variants.parallel.dedup import OneCopyPerRankDispatcher

WORLD, E, D = 2, 4, 8  # ranks hold experts {0, 1} and {2, 3}
IDS = [  # (T=4, K=2) per rank; (rank of the expert) in comments
    torch.tensor([[0, 1], [0, 2], [2, 3], [1, 3]]),  # (0,0) (0,1) (1,1) (0,1): pairs per rank 3 + 3, copies 4 + 4
    torch.tensor([[3, 2], [1, 0], [0, 3], [2, 1]]),  # (1,1) (0,0) (0,1) (1,0): pairs 3 + 3, copies 4 + 4
]


def _layer(rank: int, dispatcher_cls: type, keep: torch.Tensor | None):
    """One MoE layer's dispatch -> experts -> combine on this rank's constructed tokens; (output, grads, d)."""
    torch.manual_seed(0)
    full = LoopExperts(dim=D, hidden_dim=12, num_experts=E)
    full.reset_parameters(0.5)  # (built empty: the model initialises its experts)
    experts = LoopExperts(dim=D, hidden_dim=12, num_experts=E // WORLD)
    lo = rank * E // WORLD
    with torch.no_grad():
        experts.w13.copy_(full.w13[lo:lo + E // WORLD])
        experts.w2.copy_(full.w2[lo:lo + E // WORLD])
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(4, D, generator=g, requires_grad=True)
    weights = torch.rand(4, 2, generator=g).requires_grad_(True)
    dispatcher = dispatcher_cls(dist.group.WORLD, E)
    d = dispatcher.dispatch(x, IDS[rank], keep_TK=keep)
    out = dispatcher.combine(experts(d.x, d.tokens_per_expert), weights, d)
    (out * torch.linspace(-1, 1, D)).sum().backward()
    return out.detach(), [x.grad, weights.grad, experts.w13.grad, experts.w2.grad], d


def _check_known_answers(rank: int) -> None:
    for keep, want_pairs in ((None, [3, 3]), (torch.tensor([[True, True], [True, False], [True, True], [True, True]]),
                                              [[3, 2], [3, 3]][rank])):
        if keep is not None and rank == 1:
            keep = None  # only rank 0 drops a copy: (token 1, expert 2), its only copy on rank 1
        ref_out, ref_grads, ref_d = _layer(rank, P.AllToAllDispatcher, keep)
        out, grads, d = _layer(rank, OneCopyPerRankDispatcher, keep)
        copies = [4, 3] if keep is not None else [4, 4]
        assert ref_d.send_splits == copies and d.send_splits == want_pairs, (rank, ref_d.send_splits, d.send_splits)
        assert d.copy_splits == copies
        # bytes of hidden states in the forward all-to-all (fp32): 6 rows of 8 instead of 8 (5 instead of 7 with
        # the drop); each row also carries K=2 int64 local expert ids
        assert sum(d.send_splits) * D * 4 == sum(want_pairs) * 32 < sum(copies) * D * 4
        assert torch.equal(d.tokens_per_expert, ref_d.tokens_per_expert)
        assert torch.equal(d.x, ref_d.x)  # the experts see the same rows in the same order
        close(out, ref_out, "one copy per rank: output")
        for name, a, b in zip(("x", "weights", "w13", "w2"), grads, ref_grads):
            close(a, b, f"one copy per rank: grad of {name}")


def _check_model(rank: int, router: str) -> None:
    """A whole EP model with the one-copy dispatcher: logits, loss and every gradient as one process."""
    ids, labels = batch()
    ref = build(router)
    ref_loss = ref(ids, labels=labels).lm_loss
    ref_loss.backward()
    model = P.apply_expert_parallel(build(router), dispatcher=OneCopyPerRankDispatcher)
    assert all(isinstance(m.dispatcher, OneCopyPerRankDispatcher) for m in P.moe_layers(model))
    check_ep_loss_and_grads(model, ref, ref_loss, ids, labels, rank, WORLD, router)


def _checks(rank: int) -> None:
    _check_known_answers(rank)
    for router in ("topk", "span"):
        _check_model(rank, router)


def test_one_copy_per_rank_dispatcher(tmp_path: Path):
    spawn_gloo(_checks, WORLD, tmp_path)
