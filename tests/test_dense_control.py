"""The dense control of the router study: one expert, K=1, K x the expert width (``model.num_experts=1
model.num_experts_per_tok=1 model.hidden_dim=<K x hidden> router=topk loss=no_aux``) is a dense SwiGLU model with
the MoE model's active parameters; it builds, trains (both expert implementations) and is analysed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_router_zoo import compose_run

from moe_variants import Transformer
from moe_variants.model.routing import LayerSpec, RoutingContext
from moe_variants.model.transformer import MoE
from moe_variants.routers.topk import TopKRouter
from moe_variants.training.build import model_args

DENSE = ["model.num_experts=1", "model.num_experts_per_tok=1", "model.hidden_dim=256", "router=topk", "loss=no_aux"]


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_one_expert_moe_layer_is_a_dense_swiglu(impl, tiny_args):
    args = dataclasses.replace(tiny_args, num_experts=1, num_experts_per_tok=1, hidden_dim=2 * tiny_args.hidden_dim)
    torch.manual_seed(0)
    spec = LayerSpec(dim=args.dim, num_experts=1, top_k=1, vocab_size=args.vocab_size, n_layers=args.n_layers,
                     layer_idx=0)
    moe = MoE(args, TopKRouter(spec), impl)
    moe.experts.reset_parameters(0.05)
    x = torch.randn(3, 11, args.dim)
    ids = torch.randint(0, args.vocab_size, (3, 11))
    ctx = RoutingContext(ids, torch.arange(11).expand(3, 11))
    out, routing = moe(x, ctx)
    Fw = args.hidden_dim
    w1, w3, w2 = moe.experts.w13[0, :Fw], moe.experts.w13[0, Fw:], moe.experts.w2[0]  # (F, D), (F, D), (D, F)
    dense = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)  # w2(silu(w1 x) * w3 x)
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-5)
    assert torch.equal(routing.expert_ids, torch.zeros(3, 11, 1, dtype=torch.int64))
    assert torch.equal(routing.weights, torch.ones(3, 11, 1))


def test_dense_control_has_the_active_parameters_of_top2(tmp_path):
    moe, dense = (model_args(compose_run(tmp_path, *o)) for o in ([], DENSE))
    assert dense.hidden_dim == moe.num_experts_per_tok * moe.hidden_dim

    counts = [Transformer(a, router=TopKRouter).num_params() for a in (moe, dense)]
    # the same active parameters, up to the gate: E x D per layer in the MoE model, D per layer in the dense one
    gate = (moe.num_experts - 1) * moe.dim * moe.n_layers
    assert counts[0]["active"] - counts[1]["active"] == gate and counts[1]["total"] == counts[1]["active"]


def test_dense_control_trains_with_both_expert_implementations_and_is_analysed(tmp_path):
    from omegaconf import OmegaConf
    from tiny_corpus import write_tiny_corpus

    from moe_variants.analysis.analyze import run as analyze
    from moe_variants.training.run import run

    reports = {impl: run(compose_run(tmp_path / impl, *DENSE, f"experts={impl}")) for impl in ("loop", "grouped")}
    assert reports["loop"]["steps"] == 3
    assert reports["loop"]["val_loss"] == pytest.approx(reports["grouped"]["val_loss"], rel=1e-5)
    corpus = write_tiny_corpus(tmp_path / "data", {"prose": "It was a fine morning, and Emma walked {i} miles. ",
                                                   "code": "    def f{i}(x):\n        return x * {i}\n"},
                               docs_per_domain=12, val_every=3, tag="dense-tiny")
    metrics = analyze(OmegaConf.create(dict(
        ckpt=str(tmp_path / "loop"), name="dense", results_dir=str(tmp_path / "res"), corpus_dir=str(corpus),
        domains=None, sequences_per_domain=2, seq_len=32, batch_size=2, layers=None, wandb=False)))
    layer = metrics["layers"][0]
    assert layer["expert_load"] == [1.0] and layer["drop_rate"] == 0
    numbers = [v for v in _leaves(metrics) if isinstance(v, float)]
    assert numbers and all(v == v for v in numbers), "NaN in the analysis of a one-expert model"


def _leaves(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    else:
        yield x
