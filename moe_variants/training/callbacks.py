"""Training callbacks: live routing metrics (throughput: ``training.throughput``; W&B panels: ``training.dashboard``).

``RoutingMetrics`` reads the routing decisions that ``LitMoE.training_step`` returns for its own step (no hooks,
no global state) and computes the metrics with the pure functions of ``moe_variants.analysis``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from moe_variants.analysis.metrics import consecutive_repeat_rates, expert_load, router_entropy


class RoutingMetrics(L.Callback):
    """Every ``every_n_steps`` optimizer steps, log per MoE layer ``i`` under ``routing/layer{i}/``:
    ``load_max``, ``load_min``, ``max_over_mean`` (1 = balanced), ``load/e{j}`` (share of assignments),
    ``entropy`` (nats, router softmax; learned routers only), ``aux/<name>`` (unweighted aux losses) and
    ``repeat_first`` / ``repeat_any`` (consecutive-repeat rates of the first choice / of any of the top-K, Mixtral
    Table 5); layer means as ``routing/<metric>``."""

    def __init__(self, every_n_steps: int = 50, per_expert: bool = True) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self.per_expert = per_expert

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step - 1  # already incremented by the optimizer step of this batch
        if step % self.every_n_steps or not isinstance(outputs, dict) or "routing" not in outputs:
            return
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
            layer.update({f"aux/{k}": float(v) for k, v in layer_out.get("aux", {}).items()})
            for name, value in layer.items():
                metrics[f"routing/layer{i}/{name}"] = value
                means.setdefault(name, []).append(value)
            for j, share in enumerate(load.tolist()):
                metrics[f"routing/layer{i}/load/e{j}"] = share
        for name, values in means.items():
            metrics[f"routing/{name}"] = sum(values) / len(values)
        return metrics
