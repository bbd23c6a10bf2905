"""Expert parallelism on CPU: 2 processes (gloo) against one process on the whole batch.

One spawn runs every distributed check (spawning costs seconds): for the topk, hash and span routers, the EP
logits and loss equal the single-process ones, every gradient after ``sync_expert_parallel_grads`` equals the
single-process gradient (an expert shard against its slice), one optimizer step keeps them equal, the gathered
state dict loads into a single-process model and re-shards into an EP model; wrong setups fail clearly.
Also: trainer=ddp / trainer=fsdp compose, and the EP benchmark script runs on CPU under torchrun.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_gloo

from moe_variants import ModelArgs, Transformer
from moe_variants.parallel import expert_parallel as P

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
B, S = 4, 12  # global batch: 2 sequences per rank


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=128, num_experts=4,
                num_experts_per_tok=2, max_seq_len=64)
    return ModelArgs(**{**base, **kw})


def router_factory(name: str):
    from moe_variants.routers.hash import HashRouter
    from moe_variants.routers.span import SpanHeadRouter
    from moe_variants.routers.topk import TopKRouter

    return {
        "topk": TopKRouter,
        "hash": functools.partial(HashRouter, table="random", weights="learned"),
        "span": functools.partial(SpanHeadRouter, spans="fixed", span_len=3),
    }[name]


def build(router: str, experts: str = "loop", **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_args(**kw), router=router_factory(router), experts=experts)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (B, S), generator=g)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100  # the same number of labelled tokens in every row, so per-rank means weigh equally
    return ids, labels


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


# -- the distributed worker -----------------------------------------------------------------------------------
def check_ep_loss_and_grads(model: Transformer, ref: Transformer, ref_loss: torch.Tensor, ids: torch.Tensor,
                            labels: torch.Tensor, rank: int, world: int, what: str) -> None:
    """Train step of the expert-parallel ``model`` on this rank's rows of (ids, labels) against ``ref`` (one process,
    whole batch, backward already run on ``ref_loss``): the mean loss over ranks equals ref's, and after
    ``sync_expert_parallel_grads`` every dense gradient equals ref's and every expert gradient ref's rows of this
    rank's experts (4 experts)."""
    rows = slice(rank * B // world, (rank + 1) * B // world)
    loss = model(ids[rows], labels=labels[rows]).lm_loss
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    close(mean / world, ref_loss.detach(), f"{what}: loss")
    P.sync_expert_parallel_grads(model)
    lo, hi = P.local_expert_range(4, world, rank)
    experts = set(P.expert_parameter_names(model))
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        assert p.grad is not None, f"{what}: no grad of {name}"
        close(p.grad, want[lo:hi] if name in experts else want, f"{what}: grad of {name}")


def _check_router(rank: int, router: str, experts: str) -> None:
    ids, labels = batch()
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)

    ref = build(router, experts)
    ref_logits = ref(ids).logits
    ref_loss = ref(ids, labels=labels).lm_loss
    ref_loss.backward()

    ep = P.apply_expert_parallel(build(router, experts))
    assert ep.layers[0].feed_forward.experts.w13.shape[0] == 2
    close(ep(ids[rows]).logits, ref_logits[rows], f"{router}: logits")
    expert_names = set(P.expert_parameter_names(ep))
    assert expert_names and all(".experts." in n for n in expert_names)
    check_ep_loss_and_grads(ep, ref, ref_loss, ids, labels, rank, WORLD, router)

    # one step: the EP model stays the single-process model (its gathered state dict equals ref's)
    for model in (ref, ep):
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.1)
    full = P.gather_state_dict(ep)
    ref_state = ref.state_dict()
    assert full.keys() == ref_state.keys()
    for k in full:
        if isinstance(full[k], torch.Tensor):
            close(full[k], ref_state[k], f"{router}: gathered {k}")
        else:  # a router's _extra_state
            assert full[k] == ref_state[k], k

    # the full state dict loads on one process (and so into hf.save_hf), and re-shards into an EP model
    single = build(router, experts)
    P.load_state_dict_resharded(single, full)
    fresh_ep = P.apply_expert_parallel(build(router, experts))
    P.load_state_dict_resharded(fresh_ep, full)
    close(fresh_ep(ids[rows]).logits, single(ids).logits[rows], f"{router}: reloaded logits")

    # a rank's own shard does not load into a one-process model
    try:
        P.load_state_dict_resharded(build(router, experts), ep.state_dict())
    except ValueError as e:
        assert "saved with ep_size=2" in str(e) and "this run uses ep_size=1" in str(e), e
    else:
        raise AssertionError("loading a shard into a one-process model did not fail")


def _checks(rank: int) -> None:
    for router, experts in (("topk", "loop"), ("hash", "grouped"), ("span", "loop")):
        _check_router(rank, router, experts)
    try:  # E=3 experts cannot be split over 2 ranks
        P.apply_expert_parallel(build("topk", num_experts=3))
    except ValueError as e:
        assert "choose an expert-parallel size dividing num_experts" in str(e), e
    else:
        raise AssertionError("num_experts % ep_size != 0 did not fail")


def test_expert_parallel_matches_single_process(tmp_path: Path):
    spawn_gloo(_checks, WORLD, tmp_path)


# -- single-process checks ------------------------------------------------------------------------------------
def test_state_dict_shard_errors():
    model = build("topk")
    full = model.state_dict()
    shard = P.shard_state_dict(full, num_experts=4, ep_size=2, ep_rank=1)
    assert torch.equal(shard["layers.0.feed_forward.experts.w13"], full["layers.0.feed_forward.experts.w13"][2:])
    assert torch.equal(shard["tok_embeddings.weight"], full["tok_embeddings.weight"])
    with pytest.raises(ValueError, match=r"saved with ep_size=2 .*this run uses ep_size=1.*gather_state_dict"):
        P.load_state_dict_resharded(build("topk"), shard)
    with pytest.raises(ValueError, match="choose an expert-parallel size dividing num_experts"):
        P.shard_state_dict(full, num_experts=4, ep_size=3, ep_rank=0)
    with pytest.raises(ValueError, match="choose an expert-parallel size dividing num_experts"):
        P.local_expert_range(6, 4, 0)
    assert P.is_expert_key("model.layers.3.feed_forward.experts.w2")
    assert not P.is_expert_key("layers.3.feed_forward.router.gate.weight")


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_trainer_configs_compose(trainer: str):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"trainer={trainer}"])
    t = cfg.trainer
    assert t.accelerator == "gpu" and t.devices == "auto" and t.precision == "bf16-mixed"
    if trainer == "ddp":
        assert t.strategy == "ddp"
    else:
        from lightning.pytorch.strategies import FSDPStrategy

        from moe_variants.model.transformer import TransformerBlock

        strategy = instantiate(t.strategy)
        assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
        assert strategy.kwargs["auto_wrap_policy"]._module_classes == {TransformerBlock}


# topk: the LM loss only, as per-rank load-balancing losses are not the global-batch one (a ~1e-4 difference in
# fp32); hash reports no aux loss, so the default (configured) loss compares exactly
# aux_free: the selection bias is updated from the global counts after each step, as by moe-train's BiasBalancing
@pytest.mark.parametrize("router,flags", [("topk", ["--loss", "lm"]), ("hash", ["--no-ddp"]),
                                          ("aux_free", ["--loss", "lm"])], ids=["topk-ddp", "hash-no_ddp", "aux_free"])
def test_benchmark_script_cpu(tmp_path: Path, router: str, flags: list[str]):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "experiments/bench/expert_parallel.py"), "--device", "cpu", "--out", str(out), *flags,
           "--steps", "3", "--warmup", "1", "--batch-size", "4", "--seq-len", "16", f"router={router}",
           "model.dim=32", "model.n_layers=2", "model.hidden_dim=48", "model.vocab_size=128", "model.num_experts=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "expert_parallel.json").read_text())
    assert result["world_size"] == 2 and result["losses_match"], result
    assert len(result["single"]["losses"]) == 3 and result["ep"]["tokens_per_s"] > 0
    assert result["single_share"]["tokens_per_s"] > 0 and result["weak_scaling_speedup"] > 0
    assert result["ddp"] == ("--no-ddp" not in flags)
    assert all(1.0 <= x <= 2.0 for x in result["ep"]["expert_load"])  # busiest of 2 ranks over the mean
    assert (out / "expert_parallel.md").is_file()
    if router == "aux_free":  # 3 updates of +-rate per expert, the same in one process and under EP
        bias, bias_ep = torch.tensor(result["single"]["expert_bias"]), torch.tensor(result["ep"]["expert_bias"])
        assert bias.shape == (2, 4) and bias.abs().max() > 0 and torch.equal(bias, bias_ep)
    else:
        assert result["single"]["expert_bias"] == []
