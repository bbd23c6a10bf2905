"""Training callbacks: live routing metrics and throughput.

``RoutingMetrics`` reads the routing decisions that ``LitMoE.training_step`` returns for its own step (no hooks,
no global state) and computes the metrics with the pure functions of ``moe_variants.analysis``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch

from moe_variants.analysis.metrics import consecutive_repeat_rates, expert_load, router_entropy


class RoutingMetrics(L.Callback):
    """At every step Lightning writes its logs (``trainer.log_every_n_steps``), log per MoE layer ``i`` under
    ``routing/layer{i}/``: ``load_max``, ``load_min``, ``max_over_mean`` (1 = balanced), ``load/e{j}`` (share of
    assignments), ``entropy`` (nats, router softmax; learned routers only), ``aux/<name>`` (unweighted aux losses)
    and ``repeat_first`` (first-choice consecutive-repeat rate, Mixtral Table 5); layer means as ``routing/<metric>``.

    The values describe the logged step: they are computed from the batch of the optimizer step that Lightning
    writes (its last micro-batch under gradient accumulation). Lightning writes a step-logged value only when
    ``global_step % log_every_n_steps == 0`` after the optimizer step, under step ``global_step - 1``, and keeps
    writing the last value logged until a new one replaces it; a value computed at any other step would be
    written later, under a step whose batch it does not describe.

    Args:
        every_n_steps: None or ``trainer.log_every_n_steps`` (anything else is refused: see above).
        per_expert: also log ``load/e{j}`` for every expert.
    """

    def __init__(self, every_n_steps: int | None = None, per_expert: bool = True) -> None:
        self.every_n_steps = every_n_steps
        self.per_expert = per_expert
        self._last_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is not None and self.every_n_steps != trainer.log_every_n_steps:
            raise ValueError(
                f"RoutingMetrics(every_n_steps={self.every_n_steps}) with trainer.log_every_n_steps="
                f"{trainer.log_every_n_steps}: Lightning writes logged values every log_every_n_steps steps, so "
                f"routing metrics computed on other steps would be written under steps they do not describe; set "
                f"callbacks.routing_metrics.every_n_steps=${{trainer.log_every_n_steps}} (or leave it unset)")
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps done, this batch's included when it ended one
        if step == self._last_step:  # a micro-batch inside gradient accumulation: its step has not ended
            return
        self._last_step = step
        n = trainer.log_every_n_steps
        if not n or step % n or not isinstance(outputs, dict) or "routing" not in outputs:
            return  # Lightning does not write logs at this step
        metrics = self.compute(outputs["routing"], pl_module.model.args.num_experts, outputs.get("doc_start"))
        if not self.per_expert:
            metrics = {k: v for k, v in metrics.items() if "/load/e" not in k}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    @staticmethod
    def compute(routing: list[dict[str, Any]], num_experts: int, doc_start: torch.Tensor | None = None
                ) -> dict[str, float]:
        """``routing``: per layer ``{"expert_ids": (B, S, K), "logits": (B, S, E) | None, "aux": {name: scalar}}``."""
        metrics: dict[str, float] = {}
        means: dict[str, list[float]] = {}
        doc_start = None if doc_start is None else doc_start.cpu()
        for i, layer_out in enumerate(routing):
            expert_ids, logits = layer_out["expert_ids"].cpu(), layer_out.get("logits")
            load = expert_load(expert_ids, num_experts)
            layer = {
                "load_max": float(load.max()),
                "load_min": float(load.min()),
                "max_over_mean": float(load.max() / load.mean()),
                "repeat_first": consecutive_repeat_rates(expert_ids, doc_start=doc_start)["first"],
            }
            if logits is not None:
                layer["entropy"] = router_entropy(logits.cpu())
            layer.update({f"aux/{k}": float(v) for k, v in layer_out.get("aux", {}).items()})
            for name, value in layer.items():
                metrics[f"routing/layer{i}/{name}"] = value
                means.setdefault(name, []).append(value)
            for j, share in enumerate(load.tolist()):
                metrics[f"routing/layer{i}/load/e{j}"] = share
        for name, values in means.items():
            metrics[f"routing/{name}"] = sum(values) / len(values)
        return metrics


class Throughput(L.Callback):
    """Training tokens per second (``train/tokens_per_s``, over the steps since the last log), excluding
    validation and checkpointing; totals for the run report in ``tokens`` and ``train_seconds``. Tokens are those
    of all ranks (each rank's batch times the world size: the data module gives every rank the same batch size),
    timed on this rank."""

    def __init__(self) -> None:
        self.tokens = 0
        self.train_seconds = 0.0
        self._t0: float | None = None
        self._window = [0, 0.0]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._t0 is None:
            return
        dt = time.perf_counter() - self._t0
        n = int(batch["input_ids"].numel()) * trainer.world_size
        self.tokens += n
        self.train_seconds += dt
        self._window[0] += n
        self._window[1] += dt
        if trainer.global_step % trainer.log_every_n_steps == 0 and self._window[1] > 0:
            pl_module.log("train/tokens_per_s", self._window[0] / self._window[1], on_step=True, on_epoch=False)
            self._window = [0, 0.0]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else math.nan
