"""Host time per optimizer step: ``moe-train``'s Lightning loop against a plain PyTorch loop, same model, same data.

On a GPU, every device -> host sync exposes the host work that follows it as idle GPU time, so the host time the
loop adds to a step is what a sync costs. Measured on the CPU, where all of a step is host time: the tiny model
(``model=tiny``) on the embedded corpus, both loops with AdamW, gradient clipping at 1.0 and the same batches
(``data=corpus``, read through the data module's loader). The Lightning loop is the run ``moe-train`` builds
(``training.build``: its callbacks, progress bar, NaN/inf guard; no logger, no validation or checkpoint inside
the timed steps); the plain loop is forward, loss, backward, clip, step, zero_grad. Prints the median ms per step
of each (time from one step's start to the next), their difference, and where each loop's time goes (cProfile over
the same steps, run separately: profiling slows Python code down): the Lightning loop's parts (cumulative ms per
step) and both loops' host functions by own time. On the CPU the NaN/inf guard's norms are compute (on a GPU they
run on the device); the parts that stay host time on a GPU are Lightning's hooks, self.log, callbacks, data.

    MOE_DATA_ROOT=data PYTHONPATH=. python experiments/bench/host_overhead.py [--steps 200] [--seq-len 32 --batch 4]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe_variants.model.losses import compose_loss
from moe_variants.paths import CONF_DIR
from moe_variants.training.build import build, build_model

# (label, file substring, function): cumulative time of these per step, in the profile summary; Lightning runs the
# whole closure (training_step, backward) inside LitMoE.optimizer_step, so the weight check after the step is the
# difference of two rows
PARTS = [
    ("training_step (forward, loss, self.log)", "training/lit.py", "training_step"),
    ("  model forward", "model/transformer.py", "forward"),
    ("  self.log / self.log_dict", "lightning/pytorch/core/module.py", "log"),
    ("backward", "torch/autograd/__init__.py", "backward"),
    ("AdamW update", "torch/optim/adam.py", "adam"),
    ("gradient clipping", "lightning/pytorch/core/module.py", "clip_gradients"),
    ("NaN/inf guard before the step (1 read)", "training/lit.py", "on_before_optimizer_step"),
    ("zero_grad", "torch/optim/optimizer.py", "zero_grad"),
    ("next batch (data loader)", "torch/utils/data/dataloader.py", "__next__"),
    ("batch to device", "lightning/pytorch/core/module.py", "_apply_batch_transfer_handler"),
    ("callback hooks (all)", "lightning/pytorch/trainer/call.py", "_call_callback_hooks"),
    ("logger connector after each batch", "logger_connector/logger_connector.py", "on_batch_end"),
]
AFTER_STEP = ("NaN/inf guard after the step (queued check)", ("training/lit.py", "optimizer_step"),
              ("lightning/pytorch/core/module.py", "optimizer_step"))


def is_tensor_op(key: tuple[str, int, str]) -> bool:
    """A built-in of torch called as a function (an op, autograd's engine): compute, which a GPU run does on the
    device. (Ops called through operators, ``a @ b``, count in their caller's own time: cProfile does not see them.)"""
    return key[0] == "~" and "torch" in key[2]


def make_config(run_dir: str, steps: int, seq_len: int, batch: int) -> DictConfig:
    overrides = [
        "model=tiny", "logger=none", "trainer.accelerator=cpu", f"trainer.max_steps={steps}",
        f"scheduler.total_steps={steps}", f"trainer.val_check_interval={10 * steps}",
        f"callbacks.checkpoint.every_n_train_steps={10 * steps}", "trainer.enable_model_summary=false",
        f"data.seq_len={seq_len}", f"data.batch_size={batch}", f"run_dir={run_dir}", "name=host_overhead",
        "report=false",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


class StepClock(L.Callback):
    """perf_counter at the start of every training batch; cProfile from step ``profile_from`` (if given)."""

    def __init__(self, profile_from: int | None = None) -> None:
        self.starts: list[float] = []
        self.profile_from = profile_from
        self.profiler = cProfile.Profile() if profile_from is not None else None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.starts.append(time.perf_counter())
        if self.profiler is not None and trainer.global_step == self.profile_from:
            self.profiler.enable()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.starts.append(time.perf_counter())  # the last step's end (before the end-of-training save)
        if self.profiler is not None:
            self.profiler.disable()


def lightning_loop(cfg: DictConfig, profile_from: int | None = None) -> StepClock:
    r = build(cfg)
    clock = StepClock(profile_from)
    r.trainer.callbacks.insert(0, clock)
    r.trainer.fit(r.lit, datamodule=r.datamodule)
    return clock


def plain_loop(cfg: DictConfig, steps: int, profile_from: int | None = None) -> tuple[list[float], cProfile.Profile]:
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg).train()
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    coefficients = OmegaConf.to_container(cfg.loss, resolve=True)
    starts, profiler = [], cProfile.Profile()
    batches = iter(datamodule.train_dataloader())
    for i in range(steps):
        starts.append(time.perf_counter())
        if i == profile_from:
            profiler.enable()
        batch = next(batches)
        out = model(batch["input_ids"], labels=batch["labels"])
        loss, _ = compose_loss(out.lm_loss, out.routing, coefficients)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    profiler.disable()
    starts.append(time.perf_counter())
    return starts, profiler


def ms_per_step(starts: list[float], warmup: int) -> float:
    return 1e3 * statistics.median(b - a for a, b in zip(starts[warmup:], starts[warmup + 1:]))


def profile_summary(name: str, profiler: cProfile.Profile, steps: int, top: int, parts: bool = False) -> None:
    rows = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive calls, tottime, cumtime, ...)
    total = sum(row[2] for row in rows.values())
    print(f"\n{name} under cProfile: {1e3 * total / steps:.2f} ms/step")

    def cum(file: str, function: str) -> float:
        return max((row[3] for (f, _, fn), row in rows.items() if file in f and fn == function), default=0.0)

    if parts:
        for label, file, function in PARTS:
            print(f"  {label:44s} {1e3 * cum(file, function) / steps:8.3f} ms/step")
        label, outer, inner = AFTER_STEP
        print(f"  {label:44s} {1e3 * (cum(*outer) - cum(*inner)) / steps:8.3f} ms/step")
    print(f"  top {top} host functions by own time (torch ops left out), ms/step:")
    host = [(key, row) for key, row in rows.items() if not is_tensor_op(key)]
    for (f, line, fn), (calls, _, tt, _, _) in sorted(host, key=lambda kv: -kv[1][2])[:top]:
        where = f.split("site-packages/")[-1].split("moe_variants/", 1)[-1]
        print(f"    {1e3 * tt / steps:7.3f}  {calls / steps:6.1f}x  {where}:{line} {fn}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # less noise from other work on the machine; both loops alike
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        def config(name: str) -> DictConfig:
            return make_config(f"{tmp}/{name}", total, args.seq_len, args.batch)

        plain = ms_per_step(plain_loop(config("plain"), total)[0], args.warmup)
        lit = ms_per_step(lightning_loop(config("lit")).starts, args.warmup)
        plain_profile = plain_loop(config("plain_prof"), total, args.warmup)[1]
        lit_profile = lightning_loop(config("lit_prof"), args.warmup).profiler
    print(f"\nmodel=tiny, data=corpus, {args.batch} x {args.seq_len} tokens per step, median of {args.steps} steps, "
          f"1 thread:")
    print(f"  plain PyTorch loop     {plain:7.2f} ms/step")
    print(f"  Lightning (moe-train)  {lit:7.2f} ms/step  (+{lit - plain:.2f} ms/step)")
    profile_summary("plain PyTorch loop", plain_profile, args.steps, args.top)
    profile_summary("Lightning loop", lit_profile, args.steps, args.top, parts=True)


if __name__ == "__main__":
    main()
