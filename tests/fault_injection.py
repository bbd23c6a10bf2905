"""Test-only Lightning callbacks: ``KillAt`` signals its own process at a chosen optimizer step: SIGKILL between steps
(before that step's checkpoint is written) or in the middle of writing a checkpoint, or SIGINT (Ctrl-C) or SIGTERM.
Added to a run with ``+callbacks.kill._target_=fault_injection.KillAt +callbacks.kill.step=K`` and optionally
``+callbacks.kill.during_save=true`` or ``+callbacks.kill.signal=SIGINT`` (or ``SIGTERM``); ``NanGradAt`` poisons a
gradient, ``BlowUpAt`` makes one optimizer step ruin the weights, ``InfStateAt`` puts an inf into the optimizer
state; ``CountStopReductions`` writes how often ``SaveOnStop`` made an all-reduce of its own."""

from __future__ import annotations

import io
import os
import signal as signal_module
import sys

import lightning as L
import torch


class KillAt(L.Callback):
    def __init__(self, step: int, during_save: bool = False, signal: str = "SIGKILL", rank: int | None = None) -> None:
        self.step, self.during_save, self.signal = int(step), bool(during_save), getattr(signal_module, signal)
        self.rank = rank  # None: every process of the run; else only that global rank's

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.during_save:
            return
        real_save = torch.save

        def save_then_die(obj, f, *args, **kwargs):
            if trainer.global_step != self.step:
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: buf.tell() // 2])  # half a checkpoint in the temp file, then gone
            f.flush()
            os.kill(os.getpid(), signal_module.SIGKILL)

        torch.save = save_then_die  # the checkpoint IO's torch.save, in this (doomed) process only

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        # checkpoint callbacks run after every other callback: SIGKILL lands before step K's checkpoint is written
        if not self.during_save and trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signal)


class NanGradAt(L.Callback):
    """Puts a NaN into one gradient after the backward pass of step K (a bad batch, an overflow), before the
    optimizer step: ``+callbacks.nan._target_=fault_injection.NanGradAt +callbacks.nan.step=K``."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


class BlowUpAt(L.Callback):
    """Optimizer step K ruins the weights: its learning rate x ``factor`` (AdamW's decay multiplies every weight by
    1 - lr x weight_decay); the LR schedule sets the next step's LR as it would have. ``+callbacks.blow._target_=
    fault_injection.BlowUpAt +callbacks.blow.step=K``."""

    def __init__(self, step: int, factor: float = 1e6) -> None:
        self.step, self.factor = int(step), float(factor)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step == self.step:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor


class InfStateAt(L.Callback):
    """After optimizer step K (before the checkpoint callbacks of that step run), an inf in one parameter's AdamW
    second moment, as grad^2 overflowing it would leave; the weights stay finite (the update m / sqrt(inf) is 0).
    ``+callbacks.inf._target_=fault_injection.InfStateAt +callbacks.inf.step=K``."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step + 1:
            state = next(s for s in trainer.optimizers[0].state.values() if "exp_avg_sq" in s)
            state["exp_avg_sq"].view(-1)[0] = float("inf")


class CountStopReductions(L.Callback):
    """Counts the all-reduces ``SaveOnStop.on_train_batch_end`` makes itself (``reduce_boolean_decision``), in
    ``<default_root_dir>/stop_reductions-rank<R>.txt`` (rewritten at each one: a run that stops keeps its count)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        path = os.path.join(trainer.default_root_dir, f"stop_reductions-rank{trainer.global_rank}.txt")
        real, count = trainer.strategy.reduce_boolean_decision, [0]

        def write() -> None:
            with open(path, "w") as f:
                f.write(str(count[0]))

        def counted(*args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_name == "on_train_batch_end" and type(caller.f_locals.get("self")).__name__ \
                    == "SaveOnStop":
                count[0] += 1
                write()
            return real(*args, **kwargs)

        write()
        trainer.strategy.reduce_boolean_decision = counted
