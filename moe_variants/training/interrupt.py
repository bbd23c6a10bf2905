"""Where training stops is saved: at ``max_steps`` and, on Ctrl-C or SIGTERM, after finishing the running optimizer
step.

Lightning's ``ModelCheckpoint`` writes ``last.ckpt`` only with its step cadence, so a run stopping between two
cadence steps (``trainer.max_steps`` not a multiple of ``every_n_train_steps``) lost its last steps; here the final
step is always in ``checkpoints/last.ckpt``. A fresh run also saves its initial state (step 0) there before the
first step, so that a run whose first step already blows up (``optimizer.lr=1e6``) has a finite checkpoint to resume
from with a lower LR.

The first Ctrl-C (SIGINT) or SIGTERM (what SLURM and other schedulers send on preemption or at the time limit,
usually some seconds before SIGKILL) only sets a flag; the step that is running completes, is saved, and training
stops by raising :class:`Interrupted` (``training.run`` then closes the W&B run as interrupted, prints the command
that resumes it and exits with 130 for SIGINT, 143 for SIGTERM). A second signal stops at once
(``KeyboardInterrupt``); ``last.ckpt`` then keeps the step saved before. Stopping only between optimizer steps
matters: a signal landing inside ``optimizer.step`` would otherwise leave half-updated weights and moments behind.
While training, these handlers replace Lightning's SIGTERM handler (which would stop after the batch without saving
it) and are restored afterwards.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

SIGNALS = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143)}  # name, the shell's exit code


class Interrupted(BaseException):  # not an Exception: nothing on the way out of Lightning may swallow it
    """Training stopped on Ctrl-C or SIGTERM (``signal_name``) after saving step ``step`` to ``checkpoint``;
    ``exit_code`` is the shell's code for that signal."""

    def __init__(self, step: int, checkpoint: Path, signal_name: str = "Ctrl-C", exit_code: int = 130) -> None:
        super().__init__(f"interrupted ({signal_name}): step {step} saved to {checkpoint}")
        self.step, self.checkpoint, self.signal_name, self.exit_code = step, checkpoint, signal_name, exit_code


class SaveOnStop(Checkpoint):
    """Saves the step where ``fit`` ends to ``checkpoint`` unless a checkpoint of that step was just written, and
    installs the SIGINT and SIGTERM handlers for the duration of training (main thread only; elsewhere they are
    Python's and Lightning's). With several processes, the ranks agree so that all stop at the same step, also when
    only some of them got the signal: through :meth:`agree`, from the all-reduce that ``LitMoE``'s NaN/inf check
    makes at every optimizer step anyway, else by an all-reduce of its own (each a GPU sync).

    A ``Checkpoint`` callback so that Lightning runs it after ``ModelCheckpoint`` (checkpoint callbacks run last, in
    their order): what that one has just saved is not written twice."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.requested = False
        self.signum: int | None = None  # the signal that asked to stop
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = -1
        self._saved_step = -1  # global step of the last checkpoint written in this process
        self._agreed: tuple[int, bool] | None = None  # (global step, whether any rank asked to stop): see agree

    def agree(self, step: int, requested_on_any_rank: bool) -> None:
        """The ranks' joint decision for the optimizer step that ends at global step ``step``, read from an all-reduce
        that another part of the step makes anyway (``LitMoE.on_before_optimizer_step``): the end of that batch then
        makes none of its own. A signal that comes after it counts at the next step, on every rank alike."""
        self._agreed = (step, requested_on_any_rank)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested, self.signum, self._agreed = False, None, None
        if trainer.global_step == 0 and trainer.ckpt_path is None:  # a fresh run's initial state: a run that
            trainer.save_checkpoint(self.checkpoint)  # blows up at its first step still has one to resume from
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C or SIGTERM: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        name = SIGNALS[signum][0]
        print(f"\n{name}: finishing this step and saving it to {self.checkpoint} ({name} again to stop at once)",
              file=sys.stderr, flush=True)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self._step_at_batch_start:  # mid gradient accumulation: no step ended (all ranks)
            return
        requested = self.requested
        if trainer.world_size > 1:
            agreed = self._agreed
            if agreed is not None and agreed[0] == trainer.global_step:
                requested = agreed[1]
            else:
                requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        if self._saved_step != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint)
        name, code = SIGNALS.get(self.signum, ("a signal to another process of the run", 130))
        raise Interrupted(trainer.global_step, self.checkpoint, name, code)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.checkpoint)
        self._restore()  # now: Lightning restores its own SIGTERM handler's predecessor before any teardown hook

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}
