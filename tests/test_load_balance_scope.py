"""``load_balance_scope=global`` on CPU: 2 processes (gloo) against one process on the whole batch.

A constructed case where the scopes differ with known answers (each rank's tokens all go to one expert, a
different one per rank: every rank alone is fully imbalanced, the global batch is balanced), then real models
(top-k and span routers, data-parallel): with the global scope every layer's load-balance loss equals the
one-process loss on the global batch, and so does every gradient of lm + aux after the data-parallel average.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_gloo
from test_parallel import B, batch, build, close

from moe_variants import ModelArgs, Transformer
from moe_variants.model.losses import compose_loss, load_balance_loss
from moe_variants.parallel.load_balance import check_load_balance_scope, use_global_load_balance
from moe_variants.routers.topk import TopKRouter

WORLD = 2
COEF = {"load_balance": 0.5, "z_loss": 0.0}  # a large coefficient: the aux gradient is not lost in the LM's


def _constructed_case(rank: int) -> None:
    E, T = 2, 2  # rank r: 2 tokens, both certain of expert r and sent there
    probs = torch.zeros(T, E)
    probs[:, rank] = 1.0
    probs.requires_grad_(True)
    ids = torch.full((T, 1), rank)
    local = load_balance_loss(probs, ids)
    assert local.item() == pytest.approx(2.0)  # E * f_r * P_r = 2 * 1 * 1: the most imbalanced value
    glob = load_balance_loss(probs, ids, dist.group.WORLD)
    assert glob.item() == pytest.approx(1.0)  # f = P = (1/2, 1/2) over the 4 tokens: balanced
    glob.backward()
    # one process: d/dprobs = E * f_e / T_all = 2 * 0.5 / 4 = 0.25 per token; this rank's gradient is W x that,
    # which the data-parallel average over W ranks brings back to 0.25
    torch.testing.assert_close(probs.grad, torch.full((T, E), 0.5))


def _check_router(rank: int, router: str) -> None:
    ids, labels = batch()
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    ref = build(router)
    out = ref(ids, labels=labels)
    ref_lb = [r.aux_losses["load_balance"].detach() for r in out.routing]
    compose_loss(out.lm_loss, out.routing, COEF)[0].backward()

    local = build(router)
    local_lb = [r.aux_losses["load_balance"] for r in local(ids[rows], labels=labels[rows]).routing]
    mean_local = torch.stack(local_lb).detach().clone()
    dist.all_reduce(mean_local)
    # the mean of per-rank losses is not the global-batch loss (by ~1e-3 here)
    assert not torch.allclose(mean_local / WORLD, torch.stack(ref_lb), rtol=1e-4, atol=0), (mean_local, ref_lb)

    model = build(router)
    assert use_global_load_balance(model) == 2  # one router per layer
    out = model(ids[rows], labels=labels[rows])
    for layer, (r, want) in enumerate(zip(out.routing, ref_lb)):
        close(r.aux_losses["load_balance"], want, f"{router}: load_balance of layer {layer}")
    compose_loss(out.lm_loss, out.routing, COEF)[0].backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)  # the data-parallel average
        close(grad / WORLD, ref_params[name].grad, f"{router}: grad of {name}")

    model.eval()  # eval forwards keep each process's statistics (and run no collective)
    with torch.no_grad():
        got = model(ids[rows]).routing[0].aux_losses["load_balance"]
        close(got, local.eval()(ids[rows]).routing[0].aux_losses["load_balance"], f"{router}: eval scope")


def _checks(rank: int) -> None:
    _constructed_case(rank)
    for router in ("topk", "span"):
        _check_router(rank, router)


def test_global_load_balance_matches_single_process(tmp_path: Path):
    spawn_gloo(_checks, WORLD, tmp_path)


def _compiled_checks(rank: int) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=48, vocab_size=64,
                                  num_experts=4, num_experts_per_tok=2, max_seq_len=16),
                        router=TopKRouter, experts="grouped").to(torch.bfloat16)  # the GPU path's experts
    use_global_load_balance(model)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))

    def lb_and_grads(m):
        model.zero_grad()
        lb = m(ids, labels=ids).routing[0].aux_losses["load_balance"]
        lb.backward()
        # (a parameter the loss does not reach: None eagerly, zeros compiled)
        return lb.detach().float(), [torch.zeros_like(p, dtype=torch.float) if p.grad is None else p.grad.float()
                                     for p in model.parameters()]

    eager_lb, eager_grads = lb_and_grads(model)
    compiled_lb, compiled_grads = lb_and_grads(torch.compile(model, fullgraph=True))  # no graph break
    torch.testing.assert_close(compiled_lb, eager_lb, atol=1e-3, rtol=1e-2)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, atol=4e-3, rtol=2e-2)


@pytest.mark.slow
def test_global_scope_compiles_to_one_graph(tmp_path: Path):
    """The all-reduce of the statistics traces into the compiled graph (the GPU path runs compiled): same loss and
    gradients as eager."""
    spawn_gloo(_compiled_checks, WORLD, tmp_path)


def test_scope_is_checked():
    assert check_load_balance_scope("global") == "global"
    with pytest.raises(ValueError, match=r"load_balance_scope='world': choose 'local' .* or 'global'"):
        check_load_balance_scope("world")
