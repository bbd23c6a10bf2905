"""Training callbacks: live routing metrics and the bias update of auxiliary-loss-free balancing (throughput:
``training.throughput``; W&B panels: ``training.dashboard``).

``RoutingMetrics`` and ``BiasBalancing`` read the routing decisions that ``LitMoE.training_step`` returns for its own
step (no hooks, no global state); the metrics are the pure functions of ``moe_variants.analysis``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from moe_variants.analysis.metrics import consecutive_repeat_rates, expert_load, router_entropy
from moe_variants.model.experts import expert_counts
from moe_variants.routers.aux_free import AuxFreeRouter


class RoutingMetrics(L.Callback):
    """At every step Lightning writes its logs (``trainer.log_every_n_steps``), log per MoE layer ``i`` under
    ``routing/layer{i}/``: ``load_max``, ``load_min``, ``max_over_mean`` (1 = balanced), ``load/e{j}`` (share of
    assignments), ``entropy`` (nats, router softmax; learned routers only), ``aux/<name>`` (unweighted aux losses)
    and ``repeat_first`` / ``repeat_any`` (consecutive-repeat rates of the first choice / of any of the top-K,
    Mixtral Table 5); layer means as ``routing/<metric>``. Loads count the copies that experts compute; where some
    are not (``RouterOutput.dropped``: capacity, or expert choice's unused slots) also ``drop_rate`` (share of the
    K slots not computed) and ``unrouted`` (share of tokens with no expert at all).

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
        """``routing``: per layer ``{"expert_ids": (B, S, K), "logits": (B, S, E) | None, "aux": {name: scalar},
        "dropped": (B, S, K) bool | None}``."""
        metrics: dict[str, float] = {}
        means: dict[str, list[float]] = {}
        doc_start = None if doc_start is None else doc_start.cpu()
        for i, layer_out in enumerate(routing):
            expert_ids, logits = layer_out["expert_ids"].cpu(), layer_out.get("logits")
            dropped = layer_out.get("dropped")
            if dropped is None:
                load = expert_load(expert_ids, num_experts)
            else:  # the computed copies only, read as one row of K = 1 choices
                dropped = dropped.cpu()
                load = expert_load(expert_ids[~dropped].view(1, -1), num_experts)
            repeats = consecutive_repeat_rates(expert_ids, doc_start=doc_start)
            layer = {
                "load_max": float(load.max()),
                "load_min": float(load.min()),
                "max_over_mean": float(load.max() / load.mean()),
                "repeat_first": repeats["first"],
                "repeat_any": repeats["any"],
            }
            if logits is not None:
                layer["entropy"] = router_entropy(logits.cpu())
            if dropped is not None:
                layer["drop_rate"] = float(dropped.float().mean())
                layer["unrouted"] = float(dropped.all(-1).float().mean())
            layer.update({f"aux/{k}": float(v) for k, v in layer_out.get("aux", {}).items()})
            for name, value in layer.items():
                metrics[f"routing/layer{i}/{name}"] = value
                means.setdefault(name, []).append(value)
            for j, share in enumerate(load.tolist()):
                metrics[f"routing/layer{i}/load/e{j}"] = share
        for name, values in means.items():
            metrics[f"routing/{name}"] = sum(values) / len(values)
        return metrics


class BiasBalancing(L.Callback):
    """Auxiliary-loss-free balancing (``routers.aux_free``): once per optimizer step, each ``AuxFreeRouter`` gets
    ``update_bias(counts)`` with its layer's assignment counts summed over every micro-batch of the step (gradient
    accumulation) and every rank (so replicated routers stay identical). Every ``every_n_steps`` steps it logs per
    layer ``routing/layer{i}/bias_min``, ``bias_max``, ``bias_std`` and their layer means ``routing/bias_*``. Does
    nothing for models without such routers."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self._counts: dict[int, torch.Tensor] = {}  # layer -> (E,) assignments since the last optimizer step
        self._step_at_batch_start = 0

    @staticmethod
    def routers(pl_module: L.LightningModule) -> dict[int, AuxFreeRouter]:
        return {i: r for i, r in enumerate(pl_module.model.routers) if isinstance(r, AuxFreeRouter)}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        routers = self.routers(pl_module)
        if not routers:
            return
        if not isinstance(outputs, dict) or "routing" not in outputs:
            raise ValueError("BiasBalancing needs the routing decisions in training_step's outputs (LitMoE's)")
        for i, router in routers.items():
            counts = expert_counts(outputs["routing"][i]["expert_ids"], router.num_experts)
            self._counts[i] = counts if i not in self._counts else self._counts[i] + counts
        if trainer.global_step == self._step_at_batch_start:
            return  # accumulating gradients: no optimizer step in this batch yet
        stacked = torch.stack([self._counts[i] for i in routers])
        stacked = trainer.strategy.reduce(stacked, reduce_op="sum")  # every rank's tokens; identity on one device
        for counts, router in zip(stacked, routers.values()):
            router.update_bias(counts)
        self._counts = {}
        n = trainer.log_every_n_steps  # log only at steps Lightning writes (see RoutingMetrics)
        if n and trainer.global_step % n == 0:
            pl_module.log_dict(self.bias_stats(routers), on_step=True, on_epoch=False)

    @staticmethod
    def bias_stats(routers: dict[int, AuxFreeRouter]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for i, router in routers.items():
            b = router.expert_bias.float()
            for name, value in (("bias_min", b.min()), ("bias_max", b.max()), ("bias_std", b.std())):
                metrics[f"routing/layer{i}/{name}"] = float(value)
        for name in ("bias_min", "bias_max", "bias_std"):
            metrics[f"routing/{name}"] = sum(metrics[f"routing/layer{i}/{name}"] for i in routers) / len(routers)
        return metrics
