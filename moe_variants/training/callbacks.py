"""Training callbacks: live routing metrics, routing churn on a fixed probe batch and the bias update of
auxiliary-loss-free balancing (throughput: ``training.throughput``; W&B panels: ``training.dashboard``).

``RoutingMetrics`` and ``BiasBalancing`` read the routing decisions that ``LitMoE.training_step`` returns for its own
step (no hooks, no global state); the metrics are the pure functions of ``moe_variants.analysis``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning_utilities.core.apply_func import apply_to_collection

from moe_variants.analysis.metrics import (
    consecutive_repeat_rates,
    expert_load,
    expert_sets,
    router_entropy,
    set_churn,
)
from moe_variants.model.experts import expert_counts
from moe_variants.routers.aux_free import AuxFreeRouter

log = logging.getLogger(__name__)


def to_host(tree: Any) -> Any:
    """``tree`` (nested lists/dicts/tuples) with every tensor on the CPU, in one wait for the GPU: the copies are
    queued without blocking (into pinned memory), then the stream is synchronised once, instead of once per
    ``.cpu()`` or ``float()`` of a GPU tensor (dozens per log step: a few tensors per MoE layer)."""
    on_gpu = []

    def copy(t: torch.Tensor) -> torch.Tensor:
        on_gpu.append(t.is_cuda)
        return t.to("cpu", non_blocking=True)

    host = apply_to_collection(tree, torch.Tensor, copy)
    if any(on_gpu):
        torch.cuda.current_stream().synchronize()  # the queued copies are done: the host tensors may be read
    return host


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
        routing, doc_start = to_host((outputs["routing"], outputs.get("doc_start")))
        metrics = self.compute(routing, pl_module.model.args.num_experts, doc_start)
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


class RoutingChurn(L.Callback):
    """How much the routing still changes: on a fixed probe batch (the first ``sequences_per_domain`` validation
    windows of every domain, chosen once per run), the top-K expert *set* of every (token, layer) (order inside the
    set ignored; dropped slots left out) at the start of training (init) and at the end of every validation.
    Logs ``routing/churn`` (share of (token, layer) sets that changed since the previous evaluation),
    ``routing/churn_from_init`` (since the init evaluation) and ``routing/churn/layer_<i>``; ``history`` (one
    ``{"step", "churn", "churn_from_init"}`` per evaluation after init) goes into the run report as ``churn``.

    The probe runs in eval mode without gradients, outside the training RNG stream, on every process (the same
    windows everywhere: expert- and fully-sharded models need every rank in the forward; replicated routers give
    every rank the same sets, so nothing is reduced). Its state (probe, init and previous sets, history) is saved
    in checkpoints; a resumed run evaluates once at its first step unless the checkpoint's last evaluation was at
    that step (the last validation of a stopped run runs after its checkpoint is written), so the history goes on
    where it stopped. Not measured under FSDP (a warning says so).

    Args:
        sequences_per_domain: probe windows per validation domain (a few: it costs one forward of that many).
    """

    batch_rows = 8  # probe windows per forward

    def __init__(self, sequences_per_domain: int = 4) -> None:
        if sequences_per_domain < 1:
            raise ValueError(f"RoutingChurn(sequences_per_domain={sequences_per_domain}): set it >= 1")
        self.sequences_per_domain = int(sequences_per_domain)
        self.probe: torch.Tensor | None = None  # (N, S) token ids
        self.init_sets: torch.Tensor | None = None  # (N, S, L, K) sorted expert ids at init
        self.prev_sets: torch.Tensor | None = None  # at the last evaluation
        self.last_step: int | None = None  # step of the last evaluation
        self.history: list[dict[str, float | int]] = []

    # -- the probe ------------------------------------------------------------------------------------------
    def probe_ids(self, trainer: L.Trainer) -> torch.Tensor | None:
        """(N, S) the first windows of every validation domain, or None without validation data."""
        source = trainer.datamodule if trainer.datamodule is not None else None
        loaders = source.val_dataloader() if source is not None and hasattr(source, "val_dataloader") else None
        if loaders is None:
            return None
        rows: list[torch.Tensor] = []
        with torch.random.fork_rng(devices=[]):  # a loader iterator draws its base seed from the global RNG
            for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
                taken = 0
                for batch in loader:
                    ids = batch["input_ids"][: self.sequences_per_domain - taken]
                    rows.append(ids.cpu())
                    taken += ids.shape[0]
                    if taken >= self.sequences_per_domain:
                        break
        return torch.cat(rows) if rows else None

    def routing_sets(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        """(N, S, L, K) the sorted top-K expert sets of the probe under the current weights."""
        model = pl_module.model
        was_training = model.training
        model.eval()
        chunks = []
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for ids in self.probe.split(self.batch_rows):  # no logits: the routing is all it needs
                    rows = ids.shape[0]
                    # every forward the same shape: a smaller last one would make a compiled model compile again
                    # (for any batch size); the padding rows repeat the first and are left out of the sets
                    ids = torch.cat([ids, ids[:1].expand(self.batch_rows - rows, -1)])
                    out = model(ids.to(pl_module.device), return_logits=False)
                    chunks.append(torch.stack([
                        expert_sets(r.expert_ids[:rows], None if r.dropped is None else r.dropped[:rows])
                        .cpu().to(torch.int16) for r in out.routing], dim=2))
        finally:
            model.train(was_training)
        return torch.cat(chunks)

    # -- hooks ---------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            # the probe calls the inner model, outside the FSDP root that gathers the unwrapped weights
            log.warning("RoutingChurn: not measured under FSDP (trainer=fsdp); use trainer=ddp to measure churn")
            return
        if self.probe is None:
            self.probe = self.probe_ids(trainer)
            if self.probe is None:
                log.info("RoutingChurn: no validation data, no churn is measured")
                return
        step = trainer.global_step
        if self.init_sets is None:
            if step > 0:
                log.warning("RoutingChurn: the checkpoint holds no routing at init; churn_from_init counts from "
                            "step %d", step)
            self.init_sets = self.prev_sets = self.routing_sets(trainer, pl_module)
            self.last_step = step
        elif self.last_step != step:
            self.record(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.init_sets is None or self.last_step == trainer.global_step:
            return
        metrics = self.record(trainer, pl_module)
        pl_module.log_dict(metrics, add_dataloader_idx=False)

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate the probe now, append to ``history``, return the metrics to log."""
        sets = self.routing_sets(trainer, pl_module)
        changed = set_churn(self.prev_sets, sets).float()  # (N, S, L)
        metrics = {"routing/churn": float(changed.mean()),
                   "routing/churn_from_init": float(set_churn(self.init_sets, sets).float().mean())}
        for i, share in enumerate(changed.mean(dim=(0, 1)).tolist()):
            metrics[f"routing/churn/layer_{i}"] = share
        self.prev_sets, self.last_step = sets, trainer.global_step
        self.history.append({"step": trainer.global_step, "churn": metrics["routing/churn"],
                             "churn_from_init": metrics["routing/churn_from_init"]})
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.init_sets is None:
            return {}
        return {"probe": self.probe, "init_sets": self.init_sets, "prev_sets": self.prev_sets,
                "last_step": self.last_step, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.probe, self.init_sets, self.prev_sets = state_dict["probe"], state_dict["init_sets"], state_dict[
            "prev_sets"]
        self.last_step, self.history = state_dict["last_step"], [dict(h) for h in state_dict["history"]]
