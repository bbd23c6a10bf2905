"""Where training stops is saved: at ``max_steps`` and, on Ctrl-C, after finishing the running optimizer step.

Lightning's ``ModelCheckpoint`` writes ``last.ckpt`` only with its step cadence, so a run stopping between two
cadence steps (``trainer.max_steps`` not a multiple of ``every_n_train_steps``) lost its last steps; here the final
step is always in ``checkpoints/last.ckpt``.

The first Ctrl-C (SIGINT) only sets a flag; the step that is running completes, is saved, and training stops by
raising :class:`Interrupted` (``training.run`` then closes the W&B run as interrupted and prints the command that
resumes it). A second Ctrl-C stops at once (``KeyboardInterrupt``); ``last.ckpt`` then keeps the step saved before.
Stopping only between optimizer steps matters: a SIGINT landing inside ``optimizer.step`` would otherwise leave
half-updated weights and moments behind.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint


class Interrupted(BaseException):  # not an Exception: nothing on the way out of Lightning may swallow it
    """Training stopped on Ctrl-C after saving step ``step`` to ``checkpoint``."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted (Ctrl-C): step {step} saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class SaveOnStop(Checkpoint):
    """Saves the step where ``fit`` ends to ``checkpoint`` unless a checkpoint of that step was just written, and
    installs the SIGINT handler for the duration of ``fit`` (main thread only; elsewhere Ctrl-C is Python's). With
    several processes, the ranks agree (a boolean all-reduce per batch) so that all stop at the same step.

    A ``Checkpoint`` callback so that Lightning runs it after ``ModelCheckpoint`` (checkpoint callbacks run last, in
    their order): what that one has just saved is not written twice."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.requested = False
        self._previous: Any = None
        self._step_at_batch_start = -1
        self._saved_step = -1  # global step of the last checkpoint written in this process

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nCtrl-C: finishing this step and saving it to {self.checkpoint} (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested or trainer.global_step == self._step_at_batch_start:  # mid gradient accumulation
            return
        if self._saved_step != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint)
        raise Interrupted(trainer.global_step, self.checkpoint)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.checkpoint)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None
