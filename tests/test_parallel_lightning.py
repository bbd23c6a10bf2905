"""Expert parallelism in the Lightning path (``moe-train trainer=ddp parallel.expert_parallel=2``) on CPU.

The EP runs are the real command: ``python -m moe_variants.training.run trainer=ddp trainer.accelerator=cpu
trainer.devices=2 ...`` in a subprocess; Lightning's DDP launcher starts the second rank with the same command
(gloo). They are compared with single-process runs (in this process) on the same global batch and seed, fp32:

- per-step global-batch losses equal (EP=2 fresh run vs one process);
- the EP run's last checkpoint holds full expert tensors and loads with ``load_model`` (one process, CPU), with
  the logits of the single-process run's last checkpoint;
- resuming across EP sizes keeps the exact optimizer state: the EP=2 step-3 checkpoint resumed with EP=1, and the
  one-process step-3 checkpoint resumed with EP=2, both reproduce the uninterrupted losses of steps 3-5;
- wrong setups fail with errors naming the fix.

The data module here (``ShardedStandin``) is the test stand-in whose batch of step t is the global batch
``_batch(seed, t, batch_size * world)``, rank r taking rows ``[r*B, (r+1)*B)`` (validation batches too);
``GlobalLoss`` records the all-reduced (global-batch) loss of every step. Both are imported by the subprocess
(tests/ on PYTHONPATH).
The load-balance aux loss is logged but not trained on (coefficient 0): like any data-parallel run, it is
computed per rank and is not the global-batch one; the z-loss is a token mean and stays exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from standin_data import StandinDataModule, _batch
from torch.utils.data import DataLoader, IterableDataset

B, STEPS = 2, 6  # per-rank batch; steps (checkpoint every 3)
COMMON = ["model=tiny", "data=standin", "data._target_=test_parallel_lightning.ShardedStandin", "data.seq_len=32",
          "logger=csv", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "trainer.val_check_interval=100",
          "trainer.max_steps=6", "scheduler.total_steps=6", "scheduler.warmup_steps=2",
          "callbacks.checkpoint.every_n_train_steps=3", "loss.load_balance=0.0"]
DDP = ["trainer=ddp", "trainer.devices=2", "parallel.expert_parallel=2", f"data.batch_size={B}"]
SINGLE = ["trainer.devices=1", f"data.batch_size={2 * B}"]


# -- test-only pieces the subprocess imports ---------------------------------------------------------------------
class _ShardedStream(IterableDataset):
    def __init__(self, seed: int, start: int, stop: int, batch_size: int, seq_len: int, vocab: int, world: int,
                 rank: int) -> None:
        self.args = (seed, start, stop, batch_size, seq_len, vocab, world, rank)

    def __iter__(self):
        seed, start, stop, b, s, v, world, rank = self.args
        for i in range(start, stop):
            yield {k: t[rank * b:(rank + 1) * b] for k, t in _batch(seed, i, b * world, s, v).items()}


class ShardedStandin(StandinDataModule):
    """The stand-in data module, sharded by rank: one step of W ranks = the one-process batch of W*B rows."""

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        world, rank, start = (t.world_size, t.global_rank, t.global_step) if t is not None else (1, 0, 0)
        stream = _ShardedStream(self.seed, start, self.train_batches, self.batch_size, self.seq_len,
                                self.vocab_size, world, rank)
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> list[DataLoader]:
        """Each domain's validation batches sharded the same way: the ranks' shards make the one-process set."""
        t = self.trainer
        world, rank = (t.world_size, t.global_rank) if t is not None else (1, 0)
        return [DataLoader(_ShardedStream(10_000 + d, 0, self.val_batches, self.batch_size, self.seq_len,
                                          self.vocab_size, world, rank), batch_size=None)
                for d in range(len(self.domains))]


class GlobalLoss(L.Callback):
    """Writes, for every training step (rank 0, to ``path``): the mean loss over the ranks (the global-batch loss)
    and the squared norms of the dense and of the expert gradients as the optimizer used them (after the EP grad
    sync and clipping; expert shards summed over the ranks, counting each replica of a shard once: under hybrid
    EP x DP, and without EP). AdamW is nearly blind to a gradient's scale, so the grads are compared directly."""

    def __init__(self, path: str) -> None:
        self.path, self.losses = path, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from moe_variants.parallel.expert_parallel import is_expert_key

        grads = {n: p.grad for n, p in pl_module.model.named_parameters() if p.grad is not None}
        dense = sum(float(g.double().square().sum()) for n, g in grads.items() if not is_expert_key(n))
        stats = torch.tensor([float(outputs["loss"]), 0.0], dtype=torch.float64)
        stats[1] = sum(float(g.double().square().sum()) for n, g in grads.items() if is_expert_key(n))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            stats[0] /= dist.get_world_size()
            replicas = getattr(pl_module, "expert_replica_group", None)  # copies of each expert shard
            copies = dist.get_world_size(replicas) if replicas is not None else 1 if pl_module.ep_active else None
            stats[1] /= copies or dist.get_world_size()  # (without EP every rank holds every expert)
        self.losses[trainer.global_step - 1] = [float(stats[0]), dense, float(stats[1])]

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(self.losses))


def record(path: Path) -> list[str]:
    return ["+callbacks.global_loss._target_=test_parallel_lightning.GlobalLoss",
            f"+callbacks.global_loss.path={path}"]


def read_losses(path: Path) -> dict[int, list[float]]:
    """{step: [global loss, |dense grad|^2, |expert grad|^2]}"""
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def close_losses(got: dict[int, list[float]], want: dict[int, list[float]], steps: range, what: str) -> None:
    """Losses to 1e-6 relative (a few float32 ulps) and the expert / dense gradient-norm ratio to 1e-5: exact up to
    rounding (per-rank clipping, the bug this guards against, is off by ~1e-3 in that ratio). The total gradient
    norm only to 5e-4: Lightning's one-process clipping (torch.nn.utils.clip_grad_norm_, fp32 _foreach_norm)
    rounds the norm differently (~1e-4 relative here) from parallel.clip_grad_norm_, a uniform scale that AdamW
    does not see; without clipping the norms agree to ~1e-8."""
    assert sorted(got) == list(steps), (what, got)

    def series(run: dict[int, list[float]], f) -> torch.Tensor:
        return torch.tensor([f(*run[s]) for s in steps], dtype=torch.float64)

    checks = [("loss", lambda loss, d, e: loss, 1e-6), ("|expert grad|/|dense grad|", lambda loss, d, e: e / d, 1e-5),
              ("|grad|^2", lambda loss, d, e: d + e, 5e-4)]
    for name, f, rtol in checks:
        torch.testing.assert_close(series(got, f), series(want, f), rtol=rtol, atol=0.0,
                                   msg=lambda m, name=name: f"{what}, {name}: {m}\n got {got}\n want {want}")


# -- runs ---------------------------------------------------------------------------------------------------------
def compose_single(run_dir: Path, *overrides: str):
    from conftest import CONF_DIR, TEST_CONF_DIR
    from hydra import compose, initialize_config_dir

    base = [f"hydra.searchpath=[file://{TEST_CONF_DIR}]", f"run_dir={run_dir}", "name=single", *COMMON, *SINGLE]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*base, *overrides])


def run_ddp(cwd: Path, name: str, *overrides: str, layout: list[str] = DDP) -> Path:
    """``python -m moe_variants.training.run trainer=ddp ...`` (2 CPU processes, gloo, unless ``layout`` says
    otherwise); returns its run dir."""
    from conftest import TEST_CONF_DIR

    cmd = [sys.executable, "-m", "moe_variants.training.run", f"hydra.searchpath=[file://{TEST_CONF_DIR}]",
           "experiment=ep", f"name={name}", *COMMON, *layout, *overrides]
    tests = str(Path(__file__).resolve().parent)  # (module-scoped: conftest's PYTHONPATH may not be set yet)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
           "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return cwd / "runs" / "ep" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference (6 steps), and the EP=2 run of the same global batches."""
    from moe_variants.training.run import run

    tmp = tmp_path_factory.mktemp("ep_lightning")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the EP ranks (OMP_NUM_THREADS=1): the same CPU kernels
    try:
        single_dir = tmp / "single"
        run(compose_single(single_dir, *record(tmp / "single.json")))
        ep_dir = run_ddp(tmp, "ep2", *record(tmp / "ep2.json"))
        yield tmp, single_dir, ep_dir
    finally:
        torch.set_num_threads(threads)


def test_ep_lightning_matches_single_process_and_checkpoints_are_full(runs):
    from moe_variants.parallel.lightning import EP_KEY
    from moe_variants.training.build import load_model

    tmp, single_dir, ep_dir = runs
    ref = read_losses(tmp / "single.json")
    close_losses(read_losses(tmp / "ep2.json"), ref, range(STEPS), "EP=2 vs one process")

    ckpt = torch.load(ep_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt[EP_KEY] == {"ep_size": 2, "num_experts": 8, "full": True}
    assert ckpt["state_dict"]["model.layers.0.feed_forward.experts.w13"].shape[0] == 8
    w13 = [p for p in ckpt["optimizer_states"][0]["state"].values() if p["exp_avg"].dim() == 3]
    assert w13 and all(s["exp_avg"].shape[0] == 8 and s["exp_avg_sq"].shape[0] == 8 for s in w13)

    report = json.loads((ep_dir / "report.json").read_text())  # written once, by rank 0
    assert report["steps"] == STEPS and report["checkpoint"].endswith("last.ckpt")
    single_report = json.loads((single_dir / "report.json").read_text())
    assert report["train_tokens"] == single_report["train_tokens"]  # all ranks' tokens, not rank 0's
    # the validation loss of the whole validation set (summed over the ranks' shards), not of rank 0's shard
    assert report["val_loss"] == pytest.approx(single_report["val_loss"], rel=1e-5)
    for domain, loss in single_report["val_loss_per_domain"].items():
        assert report["val_loss_per_domain"][domain] == pytest.approx(loss, rel=1e-5), domain

    ep_model, cfg = load_model(ep_dir)  # one process, CPU, no process group
    assert cfg.parallel.expert_parallel == 2
    single_model, _ = load_model(single_dir)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ep_model(ids).logits, single_model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_resume_across_ep_sizes_keeps_optimizer_state(runs):
    """EP=2 step-3 checkpoint -> one process, and one-process step-3 checkpoint -> EP=2: steps 3-5 as uninterrupted."""
    from moe_variants.training.run import run

    tmp, single_dir, ep_dir = runs
    ref = read_losses(tmp / "single.json")
    to_single = tmp / "ep2_to_single"
    # the per-rank batch changes with the layout (the global batch does not): an explicit, allowed change
    allow = "resume_allow_changes=[data.batch_size]"
    run(compose_single(to_single, f"ckpt_path={ep_dir / 'checkpoints' / 'step000003.ckpt'}", allow,
                       *record(tmp / "ep2_to_single.json")))
    close_losses(read_losses(tmp / "ep2_to_single.json"), ref, range(3, STEPS), "EP=2 checkpoint resumed on 1")

    run_ddp(tmp, "single_to_ep2", f"ckpt_path={single_dir / 'checkpoints' / 'step000003.ckpt'}", allow,
            *record(tmp / "single_to_ep2.json"))
    close_losses(read_losses(tmp / "single_to_ep2.json"), ref, range(3, STEPS), "1-process checkpoint resumed on EP=2")


# 2 EP groups of 2 consecutive ranks x 2 replicas; 1 sequence per rank: the one-process global batch
HYBRID = ["trainer=ddp", "trainer.devices=4", "parallel=ep", "parallel.ep_size=2", "data.batch_size=1"]


@pytest.mark.slow
def test_hybrid_ep_x_dp_resumes_across_layouts(runs):
    """EP=2 (2 processes) step-3 checkpoint -> EP 2 x DP 2 (4 processes) -> one process: the losses and gradients
    of steps 3-5 as uninterrupted, the optimizer state re-sharded at each move."""
    from moe_variants.parallel.lightning import EP_KEY
    from moe_variants.training.run import run

    tmp, single_dir, ep_dir = runs
    ref = read_losses(tmp / "single.json")
    allow = "resume_allow_changes=[data.batch_size]"
    # (with the one-copy-per-rank dispatcher, inside EP groups that are not the world)
    hybrid = run_ddp(tmp, "ep2_to_hybrid", f"ckpt_path={ep_dir / 'checkpoints' / 'step000003.ckpt'}", allow,
                     "callbacks.checkpoint.every_n_train_steps=1", "parallel.one_copy_per_rank=true",
                     *record(tmp / "hybrid.json"), layout=HYBRID)
    close_losses(read_losses(tmp / "hybrid.json"), ref, range(3, STEPS), "EP=2 checkpoint resumed on EP 2 x DP 2")

    step4 = hybrid / "checkpoints" / "step000004.ckpt"
    ckpt = torch.load(step4, map_location="cpu", weights_only=False)
    assert ckpt[EP_KEY] == {"ep_size": 2, "num_experts": 8, "full": True}
    w13 = [p for p in ckpt["optimizer_states"][0]["state"].values() if p["exp_avg"].dim() == 3]
    assert w13 and all(s["exp_avg"].shape[0] == 8 for s in w13)
    run(compose_single(tmp / "hybrid_to_single", f"ckpt_path={step4}", allow, *record(tmp / "hybrid_to_single.json")))
    close_losses(read_losses(tmp / "hybrid_to_single.json"), ref, range(4, STEPS), "EP 2 x DP 2 resumed on 1")


# -- errors (one process) -----------------------------------------------------------------------------------------
def test_ep_config_errors(tmp_path):
    from moe_variants.training.build import build

    with pytest.raises(ValueError, match=r"expert-parallel size 3.*choose an expert-parallel size dividing"):
        build(compose_single(tmp_path / "a", "parallel.expert_parallel=3"))
    with pytest.raises(ValueError, match=r"DDP strategy only .*use trainer=ddp"):
        build(compose_single(tmp_path / "b", "parallel.expert_parallel=2"))
    with pytest.raises(ValueError, match=r"expert_parallel=2 but the trainer runs 1 processes.*trainer.devices=2"):
        build(compose_single(tmp_path / "c", "parallel.expert_parallel=2", "+trainer.strategy=ddp"))
    with pytest.raises(ValueError, match=r"must be an int >= 1 or 'world'"):
        build(compose_single(tmp_path / "d", "parallel.expert_parallel=0"))
    assert not any((tmp_path / d / ".running").exists() for d in "abcd")  # no run dir left claimed
    # parallel=ep: "world" = the trainer's process count (the trainer is only built here, nothing is launched)
    r = build(compose_single(tmp_path / "e", "parallel=ep", "+trainer.strategy=ddp", "trainer.devices=2"))
    r.lock.unlink()
    assert r.lit.expert_parallel == 2 and not r.lit.ep_active  # sharded in configure_model, once the group exists


def test_lit_ep_errors_without_process_group_and_for_sharded_checkpoints(tiny_args):
    from moe_variants import Transformer
    from moe_variants.routers.topk import TopKRouter
    from moe_variants.training.lit import LitMoE

    lit = LitMoE(Transformer(tiny_args, router=TopKRouter), optimizer=lambda g: torch.optim.AdamW(g, lr=1e-3),
                 scheduler=None, loss_coefficients={}, expert_parallel=2)
    with pytest.raises(ValueError, match=r"expert_parallel=2 needs 2 processes under trainer=ddp"):
        lit.configure_model()

    state = {f"model.{k}": v for k, v in lit.model.state_dict().items()}
    shard = dict(state)
    shard["model.layers.0.feed_forward.experts.w13"] = state["model.layers.0.feed_forward.experts.w13"][:4]
    with pytest.raises(ValueError, match=r"saved with ep_size=2 .*this run uses ep_size=1"):
        lit.on_load_checkpoint({"state_dict": shard})

    # an optimizer state holding a rank's shard of the expert moments is refused with the reason
    params = [p for g in lit._param_groups() for p in g]
    i = next(i for i, p in enumerate(params) if p is lit.model.layers[0].feed_forward.experts.w13)
    opt = {"state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4, *params[i].shape[1:])}},
           "param_groups": [{"params": list(range(len(params)))}]}
    with pytest.raises(ValueError, match=r"per-rank optimizer shards"):
        lit.on_load_checkpoint({"state_dict": state, "optimizer_states": [opt]})


def test_hybrid_config_errors(tmp_path):
    from moe_variants.parallel.dedup import OneCopyPerRankDispatcher
    from moe_variants.training.build import build

    ddp = ["parallel=ep", "+trainer.strategy=ddp"]
    with pytest.raises(ValueError, match=r"ep_size=4 but the trainer runs 2 processes.*not a multiple.*one of \[2\]"):
        build(compose_single(tmp_path / "a", *ddp, "trainer.devices=2", "parallel.ep_size=4"))
    with pytest.raises(ValueError, match=r"parallel.ep_size=4 and parallel.expert_parallel=2 .*disagree"):
        build(compose_single(tmp_path / "b", *ddp, "parallel.ep_size=4", "parallel.expert_parallel=2"))
    # EP 2 x DP 2: built (the groups are made in configure_model, once the processes exist)
    r = build(compose_single(tmp_path / "c", *ddp, "trainer.devices=4", "parallel.ep_size=2"))
    r.lock.unlink()
    assert r.lit.expert_parallel == 2 and r.lit.expert_replica_group is None and not r.lit.ep_active
    assert r.lit.ep_dispatcher is None  # the default: AllToAllDispatcher
    r = build(compose_single(tmp_path / "d", *ddp, "trainer.devices=2", "parallel.one_copy_per_rank=true"))
    r.lock.unlink()
    assert r.lit.ep_dispatcher is OneCopyPerRankDispatcher
    assert not any((tmp_path / d / ".running").exists() for d in "ab")


@pytest.mark.slow
def test_global_load_balance_scope_under_ddp(tmp_path):
    """Plain DDP (EP 1 x DP 2) trained with the load-balance loss: with load_balance_scope=global the losses and
    gradients of 3 steps are those of one process on the global batch."""
    from moe_variants.training.run import run

    train = ["loss.load_balance=0.05", "load_balance_scope=global", "trainer.max_steps=3", "scheduler.total_steps=3"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(compose_single(tmp_path / "single", *train, *record(tmp_path / "single.json")))
        run_ddp(tmp_path, "dp2", *train, *record(tmp_path / "dp2.json"),
                layout=["trainer=ddp", "trainer.devices=2", "parallel.ep_size=1", f"data.batch_size={B}"])
    finally:
        torch.set_num_threads(threads)
    close_losses(read_losses(tmp_path / "dp2.json"), read_losses(tmp_path / "single.json"), range(3),
                 "global load balance, DDP 2 vs one process")
