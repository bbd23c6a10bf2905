"""W&B panels of a training run: summaries that show the best validation loss, and a per-layer expert-load heatmap.

Both act on the run's ``WandbLogger`` only (nothing happens with ``logger=csv`` or ``logger=none``), on global
rank 0. Every value is logged on Lightning's step axis, ``trainer/global_step``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from moe_variants.analysis.metrics import expert_load
from moe_variants.analysis.plots import plot_load_heatmap

STEP_METRIC = "trainer/global_step"  # the x-axis Lightning's WandbLogger gives every metric
HEATMAP_KEY = "routing/load_heatmap"


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class WandbSummaries(L.Callback):
    """``define_metric`` at the start of fit: the training loss and every validation loss (overall and per domain)
    keep their minimum and last value in the run summary, on the ``trainer/global_step`` axis, so that run tables
    and grouped sweep panels show each run's best validation loss (W&B's default summary is the last value)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        domains = list(getattr(pl_module, "domains", []))
        names = ["train/loss", "val/loss", *(f"val/{d}/loss" for d in domains)]
        for logger in wandb_loggers(trainer):
            for name in names:
                logger.experiment.define_metric(name, step_metric=STEP_METRIC, summary="min,last")


class LoadHeatmap(L.Callback):
    """Every ``every_n_steps`` optimizer steps (steps 0, N, 2N, ... and the last), log ``routing/load_heatmap``: an
    image of that step's expert load per layer (rows = layers, columns = experts, share of the batch's
    assignments; :func:`moe_variants.analysis.plots.plot_load_heatmap`). Reads the routing decisions that
    ``LitMoE.training_step`` returns, as ``RoutingMetrics`` does."""

    def __init__(self, every_n_steps: int = 100) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"LoadHeatmap.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step - 1  # the step that just ran: Lightning logs this batch's metrics at it
        due = step % self.every_n_steps == 0 or trainer.global_step == trainer.max_steps
        if not due or not trainer.is_global_zero or not isinstance(outputs, dict) or "routing" not in outputs:
            return
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        num_experts = pl_module.model.args.num_experts
        load = torch.stack([expert_load(r["expert_ids"].cpu(), num_experts) for r in outputs["routing"]])  # (L, E)
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_load_heatmap(load, Path(tmp) / "load_heatmap.png", title=f"Expert load, step {step}")
            with Image.open(path) as png:
                image = png.copy()  # in memory: W&B writes its own file (it may link a path rather than copy it)
        for logger in loggers:
            logger.log_image(HEATMAP_KEY, [image], step=step, caption=[f"step {step}"])


def report_to_wandb(trainer: L.Trainer, report: dict[str, Any]) -> None:
    """The run report's headline numbers into the W&B run summary (``report/val_loss``, ``report/tokens_per_s``
    (steady state), ``report/mfu``, ``report/peak_memory_gib``, ``report/beats_unigram``): columns of the runs
    table that sweeps compare."""
    keys = ("val_loss", "tokens_per_s", "mfu", "peak_memory_gib", "unigram_entropy", "beats_unigram")
    values = {f"report/{k}": report[k] for k in keys if report.get(k) is not None}
    for logger in wandb_loggers(trainer):
        logger.experiment.summary.update(values)
