"""The router zoo beside Mixtral's top-k, with known answers: score functions, auxiliary-loss-free bias balancing
(update direction and size, once per optimizer step under gradient accumulation), shared experts (= a dense SwiGLU
of the same width), capacity dropping (drop set and rate of constructed assignments, causal, loop = grouped),
expert choice and balanced assignment (how their choices fill the (B, S, K) contract), EP with skipped copies,
HF export refusals, and moe-train + moe-analyze on each variant.

The contract and look-ahead tests of every ``conf/router/*.yaml`` are in test_routers.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import CONF_DIR, TEST_CONF_DIR, spawn_gloo
from hydra import compose, initialize_config_dir

from moe_variants import ModelArgs, Transformer
from moe_variants.model.experts import GroupedExperts, LocalDispatcher, LoopExperts, expert_capacity, over_capacity
from moe_variants.model.hf import save_hf
from moe_variants.model.routing import LayerSpec, RoutingContext
from moe_variants.routers.audit import AUDIT_ARGS, audit, synthetic_inputs
from moe_variants.routers.aux_free import AuxFreeRouter, bias_delta
from moe_variants.routers.balanced import BalancedAssignmentRouter, sinkhorn_plan
from moe_variants.routers.expert_choice import ExpertChoiceRouter
from moe_variants.routers.gates import topk_gate
from moe_variants.routers.topk import TopKRouter
from moe_variants.training.build import check_bias_balancing
from moe_variants.training.callbacks import RoutingMetrics


def spec(E: int = 4, K: int = 2, D: int = 4) -> LayerSpec:
    return LayerSpec(dim=D, num_experts=E, top_k=K, vocab_size=16, n_layers=1, layer_idx=0)


def ctx_for(B: int, S: int) -> RoutingContext:
    return RoutingContext(history_ids=torch.zeros(B, S, dtype=torch.long), positions=torch.arange(S).expand(B, S))


def tiny(**kw) -> ModelArgs:
    return ModelArgs(**{**AUDIT_ARGS, **kw})


# -- score functions ----------------------------------------------------------------------------------------
def test_score_functions_and_renormalisation():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    ids, w, scores = topk_gate(logits, 2, "sigmoid", renormalize=False)
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[2.0, 1.0]])))
    torch.testing.assert_close(scores, torch.sigmoid(logits))
    _, w, _ = topk_gate(logits, 2, "sigmoid")  # DeepSeek-V3: sigmoid top-k renormalised
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(w[0], s / s.sum())
    _, w, _ = topk_gate(logits, 2, "softmax", renormalize=False)  # Switch/GShard: raw top-k probabilities
    torch.testing.assert_close(w[0], torch.softmax(logits[0], 0)[[1, 3]])
    _, w, _ = topk_gate(logits, 2)  # Mixtral: softmax over the top-k logits
    torch.testing.assert_close(w[0], torch.softmax(torch.tensor([2.0, 1.0]), 0))
    with pytest.raises(ValueError, match="unknown score_func"):
        TopKRouter(spec(), score_func="relu")


# -- auxiliary-loss-free balancing --------------------------------------------------------------------------
def test_bias_update_direction_and_size():
    counts = torch.tensor([5, 1, 3, 3])  # mean 3: expert 0 overloaded, 1 underloaded, 2 and 3 on the mean
    torch.testing.assert_close(bias_delta(counts, 0.25), torch.tensor([-0.25, 0.25, 0.0, 0.0]))
    router = AuxFreeRouter(spec(), bias_update_rate=0.25)
    router.update_bias(counts)
    router.update_bias(counts)
    assert router.expert_bias.tolist() == [-0.5, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"needs \(4,\) counts"):
        router.update_bias(torch.ones(3))


def test_bias_update_rate_default_is_the_measured_one():
    """0.01 (results/router_zoo/README.md: 0.001 left the small model's layers collapsed); config = class default."""
    import inspect

    from omegaconf import OmegaConf

    default = inspect.signature(AuxFreeRouter).parameters["bias_update_rate"].default
    assert default == OmegaConf.load(CONF_DIR / "router" / "aux_free.yaml").bias_update_rate == 0.01
    assert AuxFreeRouter(spec()).bias_update_rate == 0.01


def test_bias_steers_the_choice_not_the_weights():
    router = AuxFreeRouter(spec())
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    out = router(torch.tensor([[[3.0, 1.0, 2.0, 0.0]]]), ctx_for(1, 1))
    assert out.expert_ids.tolist() == [[[3, 0]]]  # sigmoid(0) + 1 beats sigmoid(2) and sigmoid(1)
    s = torch.sigmoid(torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(out.weights[0, 0], s / s.sum())  # weights from the unbiased scores


def test_bias_balancing_evens_out_a_skewed_router():
    """A router that puts expert 0 in every token's top-2 (load 4x the mean) is balanced by the bias alone."""
    torch.manual_seed(0)
    router = AuxFreeRouter(spec(E=8, K=2, D=16), bias_update_rate=0.005)
    x = torch.randn(1, 512, 16)
    x[..., 0] = 1.0
    with torch.no_grad():
        router.gate.weight[0, 0] = 3.0  # expert 0's logit is ~3 higher for every token
    ctx = ctx_for(1, 512)

    def max_over_mean() -> float:
        counts = torch.bincount(router(x, ctx).expert_ids.flatten(), minlength=8).float()
        router.update_bias(counts)
        return float(counts.max() / counts.mean())

    assert max_over_mean() > 3.5
    history = [max_over_mean() for _ in range(150)]
    # a fixed-size sign step ends in a small limit cycle around balance (a larger rate: a wider cycle)
    assert max(history[-20:]) < 1.1, history[-20:]


def test_bias_is_checkpoint_state():
    torch.manual_seed(0)
    model = Transformer(tiny(), router=AuxFreeRouter)
    for r in model.routers:
        r.update_bias(torch.arange(8.0))
    state = model.state_dict()
    assert torch.equal(state["layers.1.feed_forward.router.expert_bias"], model.routers[1].expert_bias)
    fresh = Transformer(tiny(), router=AuxFreeRouter)
    fresh.load_state_dict(state)
    ids = torch.randint(0, 512, (2, 9))
    for a, b in zip(model(ids).routing, fresh(ids).routing):
        assert torch.equal(a.expert_ids, b.expert_ids)


def test_aux_free_router_needs_the_bias_callback():
    model = Transformer(tiny(), router=AuxFreeRouter)
    with pytest.raises(ValueError, match="callbacks.bias_balancing"):
        check_bias_balancing(model, [])
    check_bias_balancing(Transformer(tiny(), router=TopKRouter), [])  # other routers do not need it


# -- shared experts -----------------------------------------------------------------------------------------
def test_shared_experts_equal_a_dense_swiglu_of_the_same_width():
    torch.manual_seed(0)
    args = tiny(n_layers=1, num_shared_experts=2, shared_hidden_dim=24)
    moe = Transformer(args, router=TopKRouter).layers[0].feed_forward
    with torch.no_grad():
        moe.experts.w2.zero_()  # the routed experts add nothing
    x = torch.randn(2, 7, args.dim)
    y, _ = moe(x, ctx_for(2, 7))
    w1, w3, w2 = moe.shared_experts.w1.weight, moe.shared_experts.w3.weight, moe.shared_experts.w2.weight
    assert w1.shape == (48, args.dim)  # 2 shared experts x 24 = one SwiGLU of width 48
    torch.testing.assert_close(y, F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2))
    # ... which is the sum of the two width-24 SwiGLUs
    halves = sum(F.linear(F.silu(F.linear(x, w1[h])) * F.linear(x, w3[h]), w2[:, h])
                 for h in (slice(0, 24), slice(24, 48)))
    torch.testing.assert_close(y, halves)
    params = Transformer(args, router=TopKRouter).num_params()
    assert params["total"] - params["active"] == moe.experts.w13.numel() // 4 * 3 + moe.experts.w2.numel() // 4 * 3


# -- capacity dropping --------------------------------------------------------------------------------------
def test_capacity_drops_the_latest_positions_first():
    ids = torch.zeros(2, 3, 1, dtype=torch.long)  # 6 copies, all to expert 0 of 2
    assert expert_capacity(6, 2, 1.0) == 3
    over = over_capacity(ids, 2, 1.0)
    # position-major queue: (row 0, pos 0), (1, 0), (0, 1) fit; (1, 1), (0, 2), (1, 2) are dropped
    assert over[..., 0].tolist() == [[False, False, True], [False, True, True]]
    assert float(over.float().mean()) == 0.5

    ids = torch.tensor([[[0, 1], [0, 1], [0, 2], [3, 0]]])  # 8 copies over 4 experts: capacity 2
    over = over_capacity(ids, 4, 1.0)
    assert over[0].tolist() == [[False, False], [False, False], [True, False], [False, True]]
    assert float(over.float().mean()) == 0.25
    assert not over_capacity(ids, 4, 2.0).any()  # capacity 4 fits expert 0's four copies
    unused = torch.zeros_like(ids, dtype=torch.bool)
    unused[0, 0, 0] = True  # an unused slot takes no capacity: expert 0's copy at position 2 now fits
    assert over_capacity(ids, 4, 1.0, unused)[0].tolist() == [[False, False], [False, False], [False, False],
                                                              [False, True]]


@pytest.mark.parametrize("seed", [0, 1])
def test_dropped_copies_add_nothing_and_loop_equals_grouped(seed):
    torch.manual_seed(seed)
    E, D, Fh, T, K = 4, 32, 48, 40, 2
    loop = LoopExperts(dim=D, hidden_dim=Fh, num_experts=E)
    loop.reset_parameters(0.1)
    grouped = GroupedExperts(dim=D, hidden_dim=Fh, num_experts=E)
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(T, D, requires_grad=True)
    ids = torch.rand(T, E).argsort(-1)[:, :K]
    keep = over_capacity(ids.view(1, T, K), E, 0.6).view(T, K).logical_not()
    assert 0 < (~keep).sum() < T * K
    w = torch.softmax(torch.randn(T, K), -1)
    disp = LocalDispatcher(E)
    outs = []
    for experts in (loop, grouped):
        d = disp.dispatch(x, ids, keep_TK=keep)
        assert d.tokens_per_expert.sum() == keep.sum()
        y = disp.combine(experts(d.x, d.tokens_per_expert), w, d)
        g = torch.autograd.grad((y * torch.randn_like(y, generator=torch.Generator().manual_seed(3))).sum(),
                                [x, experts.w13, experts.w2])
        outs.append((y, *g))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the known answer: each token's kept copies, weighted; dropped ones add 0
    h = torch.einsum("td,efd->tef", x, loop.w13)
    y_all = torch.einsum("tef,edf->ted", F.silu(h[..., :Fh]) * h[..., Fh:], loop.w2)  # (T, E, D)
    expected = (y_all.gather(1, ids[..., None].expand(T, K, D)) * (w * keep)[..., None]).sum(1)
    torch.testing.assert_close(outs[0][0], expected, atol=1e-5, rtol=1e-5)


def test_capacity_in_the_model_is_causal_and_large_capacity_is_dropless():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="model.allow_lookahead=true"):
        tiny(capacity_factor=1.0)
    model = Transformer(tiny(capacity_factor=1.0, allow_lookahead=True), router=TopKRouter)
    assert not model.causal
    ids = torch.randint(0, 512, (3, 20))
    out = model(ids)
    assert all(r.dropped is not None and r.dropped.any() for r in out.routing)
    # the capacity is a share of the whole forward's copies: a prefix or cached decoding drops differently
    args = tiny(capacity_factor=1.0, allow_lookahead=True)
    assert not audit(TopKRouter, args, synthetic_inputs(args.vocab_size), seeds=1, fail_fast=True).passed
    # capacity >= every copy: nothing dropped
    roomy = Transformer(tiny(capacity_factor=8.0, allow_lookahead=True), router=TopKRouter)
    roomy.load_state_dict(model.state_dict())
    dropless = Transformer(tiny(), router=TopKRouter)
    dropless.load_state_dict(model.state_dict())
    torch.testing.assert_close(roomy(ids).logits, dropless(ids).logits)
    assert not any(r.dropped.any() for r in roomy(ids).routing)


def test_routing_metrics_count_computed_copies():
    ids = torch.tensor([[[0, 1], [0, 2], [1, 3], [2, 3]]])
    dropped = torch.tensor([[[False, False], [True, False], [True, True], [False, False]]])
    m = RoutingMetrics.compute([{"expert_ids": ids, "logits": None, "dropped": dropped}], num_experts=4)
    assert m["routing/layer0/drop_rate"] == 3 / 8 and m["routing/layer0/unrouted"] == 1 / 4
    # computed copies: experts 0, 1, 2, 2, 3 -> shares 0.2, 0.2, 0.4, 0.2
    assert [round(m[f"routing/layer0/load/e{j}"], 6) for j in range(4)] == [0.2, 0.2, 0.4, 0.2]
    assert m["routing/layer0/max_over_mean"] == pytest.approx(1.6)


# -- expert choice and balanced assignment ------------------------------------------------------------------
def test_expert_choice_fills_each_expert_exactly():
    """With as many slots as experts (K = E) nothing is capped: every expert computes exactly C tokens."""
    torch.manual_seed(0)
    router = ExpertChoiceRouter(spec(E=4, K=4, D=8), capacity_factor=1.0, allow_lookahead=True)
    out = router(torch.randn(2, 10, 8), ctx_for(2, 10))
    C = 5  # ceil(1.0 * 20 tokens / 4 experts)
    computed = out.expert_ids[~out.dropped]
    assert torch.bincount(computed, minlength=4).tolist() == [C] * 4
    affinity = torch.softmax(out.logits, -1)
    torch.testing.assert_close(out.weights, torch.where(out.dropped, 0.0, affinity.gather(-1, out.expert_ids)))
    assert (out.expert_ids.sort(-1).values == torch.arange(4)).all()  # distinct ids, fillers included


def test_expert_choice_with_k_slots_caps_tokens_and_never_overfills():
    torch.manual_seed(1)
    router = ExpertChoiceRouter(spec(E=8, K=2, D=8), allow_lookahead=True)  # c = K = 2: C = ceil(2 * 30 / 8)
    out = router(torch.randn(3, 10, 8), ctx_for(3, 10))
    counts = torch.bincount(out.expert_ids[~out.dropped], minlength=8)
    assert (counts <= 8).all() and counts.sum() <= 60
    assert (out.expert_ids[..., 0] != out.expert_ids[..., 1]).all()
    # the first slot holds a computed expert whenever the second does (chosen experts first)
    assert not (out.dropped[..., 0] & ~out.dropped[..., 1]).any()


def test_sinkhorn_balances_a_skewed_router():
    torch.manual_seed(0)
    logits = torch.randn(400, 8)
    logits[:, 0] += 3.0  # every token prefers expert 0
    log_p = sinkhorn_plan(logits, iterations=30)
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(400))
    torch.testing.assert_close(log_p.exp().sum(0), torch.full((8,), 50.0), atol=0.5, rtol=0)
    top1 = torch.bincount(log_p.argmax(-1), minlength=8).float()
    assert top1.max() / top1.mean() < 1.3  # plain top-1 would put every token on expert 0
    router = BalancedAssignmentRouter(spec(E=8, K=1, D=8), allow_lookahead=True)
    out = router(torch.randn(2, 5, 8), ctx_for(2, 5))
    torch.testing.assert_close(out.weights, torch.sigmoid(out.logits.gather(-1, out.expert_ids)))  # BASE's gate


# -- HF export ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("router, args, message", [
    (functools.partial(TopKRouter, score_func="sigmoid"), {}, "not Mixtral's learned top-k gate"),
    (functools.partial(TopKRouter, renormalize=False), {}, "not Mixtral's learned top-k gate"),
    (AuxFreeRouter, {}, "not Mixtral's learned top-k gate"),
    (TopKRouter, {"num_shared_experts": 1}, "num_shared_experts=0"),
    (TopKRouter, {"capacity_factor": 1.25, "allow_lookahead": True}, "never drops tokens"),
], ids=["sigmoid", "raw-weights", "aux_free", "shared", "capacity"])
def test_hf_export_refuses_what_mixtral_cannot_express(router, args, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        save_hf(Transformer(tiny(**args), router=router), tmp_path)


# -- expert parallelism with skipped copies -----------------------------------------------------------------
def _ep_checks(rank: int) -> None:
    from moe_variants.parallel import expert_parallel as P

    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    cases = {"capacity+shared": (TopKRouter, dict(capacity_factor=0.75, allow_lookahead=True,
                                                  num_shared_experts=1)),
             "expert_choice": (functools.partial(ExpertChoiceRouter, allow_lookahead=True), {})}
    for name, (router, kw) in cases.items():
        args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=128,
                         num_experts=4, num_experts_per_tok=2, max_seq_len=64, **kw)
        torch.manual_seed(0)
        ep = P.apply_expert_parallel(Transformer(args, router=router))
        out = ep(ids[2 * rank: 2 * rank + 2], labels=ids[2 * rank: 2 * rank + 2])
        assert all(r.dropped.any() for r in out.routing), name
        out.lm_loss.backward()
        # capacity and expert choice act on each rank's own tokens: the reference is one process per row block
        expert_grads = 0
        for r in range(2):
            torch.manual_seed(0)
            ref = Transformer(args, router=router)
            ref_out = ref(ids[2 * r: 2 * r + 2], labels=ids[2 * r: 2 * r + 2])
            if r == rank:
                torch.testing.assert_close(out.lm_loss, ref_out.lm_loss, msg=name)
            ref_out.lm_loss.backward()
            expert_grads = expert_grads + ref.layers[0].feed_forward.experts.w13.grad
        lo, hi = P.local_expert_range(4, 2, rank)
        torch.testing.assert_close(ep.layers[0].feed_forward.experts.w13.grad, expert_grads[lo:hi],
                                   rtol=1e-5, atol=1e-6, msg=name)


def test_expert_parallel_skips_dropped_copies(tmp_path: Path):
    spawn_gloo(_ep_checks, 2, tmp_path)


# -- moe-train and moe-analyze on the variants --------------------------------------------------------------
FAST = ["model=tiny", "data=standin", "data.seq_len=32", "data.batch_size=4", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=100", "scheduler.warmup_steps=2", "callbacks.checkpoint.every_n_train_steps=100",
        "logger=csv", "trainer.max_steps=3"]


def compose_run(tmp: Path, *overrides: str):
    base = [f"hydra.searchpath=[file://{TEST_CONF_DIR}]", f"run_dir={tmp}", "name=zoo", *FAST]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*base, *overrides])


class StepCounts(L.Callback):
    """Test probe: each optimizer step's expert counts per layer, summed over its micro-batches."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self.micro_batches: list[int] = []
        self._sum, self._n, self._start = None, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self._start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        counts = torch.stack([torch.bincount(r["expert_ids"].flatten(), minlength=8) for r in outputs["routing"]])
        self._sum = counts if self._sum is None else self._sum + counts
        self._n += 1
        if trainer.global_step > self._start:
            self.steps.append(self._sum)
            self.micro_batches.append(self._n)
            self._sum, self._n = None, 0


def test_aux_free_bias_updates_once_per_optimizer_step_under_accumulation(tmp_path):
    from moe_variants.training.build import build

    run = build(compose_run(tmp_path, "router=aux_free", "router.bias_update_rate=0.25", "loss=no_aux",
                            "+trainer.accumulate_grad_batches=2", "model.capacity_factor=1.0",
                            "model.allow_lookahead=true", "model.num_shared_experts=1"))
    probe = StepCounts()
    run.trainer.callbacks.append(probe)
    try:
        run.trainer.fit(run.lit, datamodule=run.datamodule)
    finally:
        run.lock.unlink(missing_ok=True)
    assert run.trainer.global_step == 3 and probe.micro_batches == [2, 2, 2]
    for i, router in enumerate(run.model.routers):
        expected = torch.zeros(8)
        for counts in probe.steps:
            expected += 0.25 * torch.sign(counts[i].float().mean() - counts[i].float())
        assert torch.equal(router.expert_bias, expected), (i, router.expert_bias, expected)
    logged = run.trainer.logged_metrics
    assert {"routing/layer0/bias_max", "routing/bias_std", "routing/drop_rate", "routing/layer1/unrouted"} <= set(
        logged)


VARIANT_RUNS = {
    "topk-sigmoid": ["router=topk", "router.score_func=sigmoid"],
    "aux_free": ["router=aux_free", "loss=no_aux"],
    "expert_choice": ["router=expert_choice", "router.allow_lookahead=true"],
    "balanced": ["router=balanced", "router.allow_lookahead=true"],
    "capacity": ["model.capacity_factor=1.0", "model.allow_lookahead=true"],
    "shared": ["model.num_shared_experts=2", "model.shared_hidden_dim=32"],
    "fine_grained": ["model.num_experts=16", "model.num_experts_per_tok=4", "model.hidden_dim=32"],
}
QUICK = {"expert_choice"}  # the default suite trains this one; the rest are slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tiny_corpus import write_tiny_corpus

    root = tmp_path_factory.mktemp("zoo_data")
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("HF_DATASETS_CACHE", str(root / "hf_cache"))
        yield write_tiny_corpus(root, {"prose": "It was a fine morning, and Emma walked {i} miles. ",
                                       "code": "    def f{i}(x):\n        return x * {i}\n"},
                                docs_per_domain=12, val_every=3, tag="zoo-tiny")


@pytest.mark.parametrize("variant", [pytest.param(v, marks=[] if v in QUICK else [pytest.mark.slow])
                                     for v in VARIANT_RUNS])
def test_variant_trains_and_is_analysed(variant, tmp_path, corpus):
    from omegaconf import OmegaConf

    from moe_variants.analysis.analyze import run as analyze
    from moe_variants.training.run import run

    report = run(compose_run(tmp_path / "run", *VARIANT_RUNS[variant]))
    assert report["steps"] == 3
    metrics = analyze(OmegaConf.create(dict(
        ckpt=str(tmp_path / "run"), name=variant, results_dir=str(tmp_path / "res"), corpus_dir=str(corpus),
        domains=None, sequences_per_domain=2, seq_len=32, batch_size=2, layers=None, wandb=False)))
    layer = metrics["layers"][0]
    assert sum(layer["expert_load"]) == pytest.approx(1.0)
    assert metrics["causal"] == (variant not in ("expert_choice", "balanced"))
    if variant in ("expert_choice", "capacity"):
        assert layer["drop_rate"] > 0
    else:
        assert layer["drop_rate"] == 0


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_load_balance_script_known_answer(tmp_path, logger):
    """Two batches, each overloading another expert 2x: per step 2.0, summed over both balanced (1.0); read from a
    CSV log and from an offline W&B run alike."""
    import importlib.util
    import sys

    spec_ = importlib.util.spec_from_file_location(
        "load_balance", Path(__file__).resolve().parents[1] / "experiments" / "router_zoo" / "load_balance.py")
    script = importlib.util.module_from_spec(spec_)
    sys.modules["load_balance"] = script
    spec_.loader.exec_module(script)
    loads = {1: [0.5, 0.25, 0.25, 0.0], 2: [0.0, 0.25, 0.25, 0.5]}  # shares of 4 experts at steps 1 and 2
    metrics = {s: {"routing/layer0/max_over_mean": max(v) * 4, **{f"routing/layer0/load/e{j}": x
                                                                  for j, x in enumerate(v)}} for s, v in loads.items()}
    if logger == "csv":
        csv_dir = tmp_path / "run" / "csv" / "version_0"
        csv_dir.mkdir(parents=True)
        header = ["step", *metrics[1]]
        lines = [",".join(header)] + [",".join(map(str, [s, *m.values()])) for s, m in metrics.items()]
        (csv_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    else:
        import wandb

        wb = wandb.init(mode="offline", dir=tmp_path / "run", project="lb-test")
        wb.log({"train/loss": 1.0})  # a row without routing metrics is skipped
        for s, m in metrics.items():
            wb.log({"trainer/global_step": s, **m})
        wb.finish()
    [(per_step, window)] = script.window_balance(script.read_loads(tmp_path / "run"), 1, 2)
    assert per_step == 2.0  # each batch: 0.5 against a mean share of 0.25
    assert window == 1.0  # summed: 0.25 each
    s = script.summary(script.read_loads(tmp_path / "run"), 1, 2, threshold=2.5)
    assert s == {"logged_steps": 2, "per_step_mean": 2.0, "per_step_worst": 2.0, "per_step_share_under": 1.0,
                 "window": 1.0}
    assert script.summary(script.read_loads(tmp_path / "run"), 2, 2)["per_step_share_under"] == 0.0
    with pytest.raises(FileNotFoundError, match="no csv"):
        script.read_loads(tmp_path / "elsewhere")
