"""What a run prints: one line per log event, and a progress bar that counts optimizer steps."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def log_through_root() -> None:
    """Send Lightning's log records to the root logger's handlers only, when the root logger has handlers (under
    Hydra: the console and ``<run_dir>/<job>.log``).

    Why: ``import lightning`` always gives the ``lightning`` logger a console handler of its own, and gives
    ``lightning.pytorch`` / ``lightning.fabric`` one too (with propagation off) when the root logger had no
    handler yet at import time. Imported after Hydra configured logging, every Lightning line reached both
    ``lightning``'s handler and Hydra's (printed twice); imported before, it reached only Lightning's (printed
    once, but missing from the run's log file). Without root handlers (a plain script) nothing is changed.
    """
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


class StepProgressBar(TQDMProgressBar):
    """One training bar over the run's optimizer steps, ``train: 120/150``, resumed runs starting where they
    stopped. (Lightning's bars count the batches of the current epoch and title them ``Epoch 0/-2`` in a run
    bounded by ``max_steps`` with ``max_epochs=-1``, as every run here is.) Its metrics are read (a GPU sync) only
    at the steps Lightning logs at (``trainer.log_every_n_steps``) and at the end."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Lightning's (the version, ``prog_bar`` values) and ``train/loss``, read here where the bar shows it: logged
        with ``prog_bar=True``, Lightning would read it to the host after every batch (a GPU sync per step)."""
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["train/loss"] = float(loss)
        return metrics

    @property
    def train_description(self) -> str:
        return "train"

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:  # not per epoch: the bar runs on
        bar = self.train_progress_bar
        if trainer.current_epoch == 0 or bar.total is None:
            bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
            bar.initial = bar.n = trainer.global_step  # tqdm's rate then counts this sitting's steps only

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or not (step % self.refresh_rate == 0 or step == bar.total):
            return
        bar.n = step
        n = trainer.log_every_n_steps
        if step == bar.total or (n and step % n == 0):  # the metrics (train/loss) only where Lightning logs them:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)  # reading a tensor syncs the GPU
        bar.refresh()
