"""``optimizer_impl`` (``training.optim``): the fused, foreach and compiled AdamW updates against torch's reference
AdamW; the compiled update compiles once under a changing LR and applies the schedule's LR; ``moe-train`` resumes
with it bit for bit, and a checkpoint of one implementation resumes with another; bad values are refused."""

from __future__ import annotations

import dataclasses
import functools
import shutil

import pytest
import torch
from conftest import TINY
from test_train import SMALL, compose_run, csv_losses
from torch._dynamo.utils import counters

from moe_variants import ModelArgs, Transformer
from moe_variants.routers.topk import TopKRouter
from moe_variants.training.checkpoint import read_checkpoint
from moe_variants.training.lit import LitMoE
from moe_variants.training.optim import build_optimizer, place_step_counters, resolve_optimizer_impl
from moe_variants.training.run import run
from moe_variants.training.schedule import warmup_cosine

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
SCHEDULE = functools.partial(warmup_cosine, warmup_steps=3, total_steps=8, min_lr_ratio=0.1)
STEPS = 8


def trained(args: ModelArgs, impl: str | None, make=ADAMW) -> tuple[Transformer, torch.optim.Optimizer]:
    """A tiny top-2 model stepped ``STEPS`` times by ``LitMoE``'s optimizer (decay, no-decay and the routers' two
    groups at 0.5 x lr) and LR schedule (warmup, then cosine: a new LR every step), on the same random gradients
    whatever the weights (model gradients would carry each implementation's rounding into the next gradients)."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(args, vocab_size=512), router=TopKRouter)
    lit = LitMoE(model, optimizer=make, scheduler=SCHEDULE, loss_coefficients={}, router_lr_scale=0.5,
                 optimizer_impl=impl)
    conf = lit.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt.step()
        sched.step()
    return model, opt


@pytest.fixture(scope="module")
def reference():
    """torch's reference AdamW: the single-tensor loop (``foreach=False``) with Python-float LRs."""
    return trained(ModelArgs(**TINY), None, make=functools.partial(ADAMW, foreach=False))


@pytest.mark.parametrize("impl", ["fused", "foreach", "compiled"])
def test_each_implementation_trains_like_torch_reference_adamw(reference, impl):
    """Same weights and moments after 8 steps of a changing LR over four groups (decay, no-decay, routers at 0.5 x
    lr): each implementation rounds in its own order (the compiled one computes the bias corrections in float32):
    within 5e-7 of the reference's weights (|w| <= ~1: 4 float32 steps at 1; measured: 1 step, and foreach is bit
    for bit the reference on the CPU) and 1e-6 of the moments' largest values (exp_avg ~1e-2, exp_avg_sq ~2e-4)."""
    want_model, want_opt = reference
    model, opt = trained(ModelArgs(**TINY), impl)
    assert len(opt.param_groups) == 4
    for (name, got), want in zip(model.named_parameters(), want_model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=5e-7, msg=lambda m: f"{name}: {m}")  # noqa: B023
        for key, atol in (("exp_avg", 1e-8), ("exp_avg_sq", 2e-10)):
            torch.testing.assert_close(opt.state[got][key], want_opt.state[want][key], rtol=0, atol=atol)
        assert float(opt.state[got]["step"]) == STEPS
    lrs = [float(g["lr"]) for g in opt.param_groups]
    want_lrs = [g["lr"] for g in want_opt.param_groups]
    torch.testing.assert_close(lrs, want_lrs, rtol=1e-6, atol=0)  # float32 tensor LRs in the compiled update


def test_compiled_update_compiles_once_and_applies_the_schedules_lr():
    """A weight with gradient 1 every step and no decay moves by exactly lr_t / (1 + eps) at step t (AdamW's
    bias-corrected moments are then 1 and 1): the LR each step applied, read back from the weights, is the
    schedule's, for two groups with different LRs; and 8 steps of a changing LR compile the update once."""
    torch._dynamo.reset()
    counters.clear()
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(functools.partial(torch.optim.AdamW, lr=0.01, betas=(0.9, 0.95), weight_decay=0.0),
                          [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.002}], "compiled")
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)
    sched = SCHEDULE(opt)
    factors = [sched.lr_lambdas[0](s) for s in range(STEPS)]
    applied = []
    for step in range(STEPS):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            opt.step()
        sched.step()
        applied.append([float((b - p.detach()).mean()) * (1 + 1e-8) for b, p in zip(before, params, strict=True)])
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 1
    assert counters["stats"]["unique_graphs"] == graphs, "the update recompiled"
    want = [[0.01 * f, 0.002 * f] for f in factors]
    torch.testing.assert_close(torch.tensor(applied), torch.tensor(want), rtol=1e-5, atol=0)
    assert len(set(factors)) == STEPS - 1  # a new LR every step but one (the warmup's last = the cosine's first)


def test_compiled_updates_of_many_optimizers_in_one_process_all_stay_compiled():
    """Each optimizer adds cache entries to torch's one ``step`` code; past 8 (dynamo's per-code limit) it would run
    eagerly, where a capturable update on the CPU raises: 10 optimizers, one after the other, all step compiled."""
    for i in range(10):
        p = torch.nn.Parameter(torch.full((3,), float(i)))
        opt = build_optimizer(functools.partial(torch.optim.AdamW, lr=0.1, weight_decay=0.0), [{"params": [p]}],
                              "compiled")
        p.grad = torch.ones_like(p)
        opt.step()
        torch.testing.assert_close(p.detach(), torch.full((3,), i - 0.1), rtol=0, atol=1e-6)


def test_step_counters_go_where_the_implementation_keeps_them():
    """After a load, ``step`` sits where the checkpoint's implementation kept it (a foreach one: on the CPU); the
    fused and the capturable (compiled) update keep it on the parameter's device (here the meta device)."""
    p, q, r = (torch.nn.Parameter(torch.zeros(2, device="meta")) for _ in range(3))
    opt = torch.optim.AdamW([{"params": [p], "fused": True}, {"params": [q], "foreach": True, "capturable": True},
                             {"params": [r], "foreach": True}])
    for x in (p, q, r):
        opt.state[x]["step"] = torch.tensor(3.0)
    place_step_counters(opt)
    assert [opt.state[x]["step"].device.type for x in (p, q, r)] == ["meta", "meta", "cpu"]


def test_auto_and_bad_values():
    assert resolve_optimizer_impl("auto", compiled_model=True) == "compiled"
    assert resolve_optimizer_impl("auto", compiled_model=False) == "fused"
    assert resolve_optimizer_impl("auto", compiled_model=False, fp16_clipping=True) == "foreach"
    assert resolve_optimizer_impl("foreach", compiled_model=True) == "foreach"
    with pytest.raises(ValueError, match="optimizer_impl=fused with fp16 loss scaling.*optimizer_impl=foreach"):
        resolve_optimizer_impl("fused", compiled_model=False, fp16_clipping=True)
    for bad in ("fast", "Fused", None, 1):
        with pytest.raises(ValueError, match=rf"optimizer_impl={bad!r}: set one of auto, fused, foreach, compiled"):
            resolve_optimizer_impl(bad, compiled_model=False)


def test_bad_value_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"optimizer_impl='fast': set one of auto, fused, foreach, compiled"):
        run(compose_run(run_dir, "optimizer_impl=fast", "trainer.max_steps=1"))
    assert not run_dir.exists() or not any(run_dir.iterdir())


RUN = ["trainer.max_steps=6", "scheduler.total_steps=6", "report=false", *SMALL]


@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory):
    """moe-train with the compiled update (tiny model, CPU): 6 steps uninterrupted, and the same run stopped after 3
    steps (its last.ckpt holds step 3). Returns (uninterrupted run dir, stopped run dir)."""
    ref_dir, stopped = tmp_path_factory.mktemp("compiled_ref"), tmp_path_factory.mktemp("compiled_stopped")
    run(compose_run(ref_dir, *RUN, "optimizer_impl=compiled"))
    run(compose_run(stopped, *RUN, "optimizer_impl=compiled", "trainer.max_steps=3"))
    return ref_dir, stopped


def test_moe_train_resumes_the_compiled_update_bit_exact(compiled_runs, tmp_path):
    """Stopped after 3 of 6 steps and resumed: the same per-step losses and LRs, weights and optimizer state as the
    uninterrupted run, bit for bit (the checkpoint holds the LR tensors; on resume they, the scheduler's base LRs
    and the step counters are set up again and the schedule refills them in place)."""
    ref_dir, stopped = compiled_runs
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    saved = read_checkpoint(run_dir)["optimizer_states"][0]["param_groups"]
    assert all(isinstance(g["lr"], torch.Tensor) and g["capturable"] for g in saved)
    run(compose_run(run_dir, *RUN, "optimizer_impl=compiled", "ckpt_path=last"))

    ref, resumed = csv_losses(ref_dir), csv_losses(run_dir)
    assert sorted(ref) == list(range(6)) and resumed == ref
    assert csv_losses(run_dir, "train/lr") == csv_losses(ref_dir, "train/lr")
    final, want = read_checkpoint(run_dir), read_checkpoint(ref_dir)
    assert all(torch.equal(final["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"]), "weights"
    for a, b in zip(final["optimizer_states"][0]["state"].values(), want["optimizer_states"][0]["state"].values(),
                    strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b), "optimizer state differs"


@pytest.mark.parametrize("other", ["fused", pytest.param("foreach", marks=pytest.mark.slow)])
def test_a_checkpoint_of_the_compiled_update_resumes_with_another(compiled_runs, tmp_path, other):
    """The step-3 checkpoint of the compiled update resumed with the fused or the foreach one: the same AdamW with
    other rounding, so the losses after it agree within 1e-5 (the implementation says how a run runs, not what it
    trains: no resume_allow_changes needed); its checkpoint then holds that implementation's flags and float LRs."""
    ref_dir, stopped = compiled_runs
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    run(compose_run(run_dir, *RUN, f"optimizer_impl={other}", "ckpt_path=last"))
    ref, switched = csv_losses(ref_dir), csv_losses(run_dir)
    assert sorted(switched) == list(range(6)) and all(switched[s] == ref[s] for s in range(4))  # step 3: its weights
    torch.testing.assert_close([switched[s] for s in range(6)], [ref[s] for s in range(6)], rtol=1e-5, atol=0)
    groups = read_checkpoint(run_dir)["optimizer_states"][0]["param_groups"]
    assert all(bool(g["fused"]) == (other == "fused") and not g["capturable"] and isinstance(g["lr"], float)
               for g in groups)


@pytest.mark.slow
def test_a_checkpoint_of_the_fused_update_resumes_compiled(compiled_runs, tmp_path):
    """The other way round: 3 fused steps, then 3 compiled ones (float LRs -> tensors) agree with the compiled run
    within 1e-5."""
    ref_dir, _ = compiled_runs
    run(compose_run(tmp_path, *RUN, "optimizer_impl=fused", "trainer.max_steps=3"))
    run(compose_run(tmp_path, *RUN, "optimizer_impl=compiled", "ckpt_path=last"))
    ref, switched = csv_losses(ref_dir), csv_losses(tmp_path)
    assert sorted(switched) == list(range(6))
    torch.testing.assert_close([switched[s] for s in range(6)], [ref[s] for s in range(6)], rtol=1e-5, atol=0)
    groups = read_checkpoint(tmp_path)["optimizer_states"][0]["param_groups"]
    assert all(g["capturable"] and not g["fused"] and isinstance(g["lr"], torch.Tensor) for g in groups)


# -- on a GPU: pytest -m gpu tests/test_optim.py ------------------------------------------------------------------
@pytest.mark.gpu
def test_compiled_update_on_the_gpu_syncs_nothing_and_matches_fused():
    """The compiled update and the schedule's in-place LR refill run without a host sync (CUDA's sync debug mode
    raises on one) and without a recompile after the first step; LRs and step counters stay on the GPU; the weights
    match the fused update's within 2e-6 after 8 steps (|w| ~ 1-4, fp32)."""
    torch._dynamo.reset()
    shapes = [(64, 32), (32,), (8, 64, 32)]
    g = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=g) for s in shapes] for _ in range(STEPS)]
    weights = {}
    for impl in ("fused", "compiled"):
        params = [torch.nn.Parameter(w.clone()) for w in init]
        opt = build_optimizer(ADAMW, [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], impl)
        sched = SCHEDULE(opt)
        for step in range(STEPS):
            for p, grad in zip(params, grads[step], strict=True):
                p.grad = grad.clone()
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                torch.cuda.set_sync_debug_mode("error" if step > 0 else "default")
                try:
                    opt.step()
                    sched.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        assert all(opt.state[p]["step"].is_cuda for p in params)
        if impl == "compiled":
            assert all(isinstance(gr["lr"], torch.Tensor) and gr["lr"].is_cuda for gr in opt.param_groups)
        weights[impl] = params
    for got, want in zip(weights["compiled"], weights["fused"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize(("first", "then"), [("foreach", "compiled"), ("foreach", "fused"), ("compiled", "foreach")])
def test_moe_train_on_the_gpu_resumes_with_another_implementation(tmp_path, first, then):
    """moe-train on a GPU, 3 steps with one implementation and 3 with another: the eager foreach update keeps its step
    counters on the CPU, the fused and the compiled one on the GPU, and a resume moves them; the losses agree with
    the uninterrupted run of the first implementation within 1e-4 (GPU kernels round differently from run to run)."""
    gpu = [*RUN, "trainer.accelerator=gpu"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run(compose_run(ref_dir, *gpu, f"optimizer_impl={first}"))
    run(compose_run(run_dir, *gpu, f"optimizer_impl={first}", "trainer.max_steps=3"))
    run(compose_run(run_dir, *gpu, f"optimizer_impl={then}", "ckpt_path=last"))
    ref, resumed = csv_losses(ref_dir), csv_losses(run_dir)
    assert sorted(resumed) == list(range(6))
    torch.testing.assert_close([resumed[s] for s in range(6)], [ref[s] for s in range(6)], rtol=1e-4, atol=0)
    state = read_checkpoint(run_dir, map_location=None)["optimizer_states"][0]["state"]
    assert all(s["step"].is_cuda == (then != "foreach") for s in state.values())
