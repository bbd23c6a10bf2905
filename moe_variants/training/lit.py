"""``LitMoE``: the thin Lightning wrapper around ``Transformer``: loss composition, logging, optimisation.

No model code and no routing maths here: the model is injected, aux-loss coefficients come from ``conf/loss``,
routing metrics are computed by ``callbacks.RoutingMetrics`` from what ``training_step`` returns, the LR schedule
is ``training.schedule``, and expert parallelism comes from ``parallel.lightning.ExpertParallelHooks``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from moe_variants.model.losses import compose_loss
from moe_variants.model.transformer import RMSNorm, Transformer
from moe_variants.parallel.lightning import ExpertParallelHooks
from moe_variants.training.checkpoint import CONFIG_KEY, nonfinite


class LitMoE(ExpertParallelHooks, L.LightningModule):
    """Args:
    model: the Transformer (router and experts already injected).
    optimizer: partial optimizer, called with parameter groups.
    scheduler: partial scheduler called with the optimizer (stepped every optimizer step), or None.
    loss_coefficients: aux-loss name -> coefficient (``conf/loss``).
    domains: validation domain names, index = dataloader_idx.
    config: the resolved run config, stored in every checkpoint (``checkpoint.load_model`` rebuilds from it).
    expert_parallel: EP size W; > 1 shards the experts over the W ranks of the (DDP) world in ``configure_model``.
    """

    def __init__(
        self,
        model: Transformer,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[[Optimizer], LRScheduler] | None,
        loss_coefficients: Mapping[str, float],
        domains: Sequence[str] = ("all",),
        config: Mapping[str, Any] | None = None,
        expert_parallel: int = 1,
    ) -> None:
        super().__init__()
        self.model = model
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.loss_coefficients = dict(loss_coefficients)
        self.domains = list(domains)
        self.config = dict(config) if config is not None else None
        self._val_sums: dict[int, list[float]] = {}  # dataloader_idx -> [sum of token losses, tokens]
        self.last_val_step: int | None = None  # global step of the last completed validation
        self._losses: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []  # this optimizer step's micro-batches
        self.expert_parallel = int(expert_parallel)
        if self.expert_parallel < 1:
            raise ValueError(f"expert_parallel must be >= 1, got {expert_parallel}")

    # -- training ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        out = self.model(batch["input_ids"], labels=batch["labels"])
        loss, parts = compose_loss(out.lm_loss, out.routing, self.loss_coefficients)
        # checked together with the gradients before the optimizer step (on_before_optimizer_step): one sync
        self._losses.append((loss.detach(), {k: v.detach() for k, v in parts.items()}))
        B = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=B)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=B)
        # for RoutingMetrics (this step only, detached: nothing keeps the graph alive)
        routing = [
            {"expert_ids": r.expert_ids.detach(), "logits": None if r.logits is None else r.logits.detach(),
             "aux": {k: v.detach() for k, v in r.aux_losses.items()}, "dropped": r.dropped}
            for r in out.routing
        ]
        return {"loss": loss, "routing": routing, "doc_start": batch.get("doc_start")}

    # -- validation: token-weighted per domain and overall --------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self.model(batch["input_ids"], labels=batch["labels"])
        n = int((batch["labels"] != -100).sum())
        acc = self._val_sums.setdefault(dataloader_idx, [0.0, 0])
        acc[0] += float(out.lm_loss) * n
        acc[1] += n

    def on_validation_epoch_end(self) -> None:
        total, tokens = 0.0, 0
        for idx, (s, n) in sorted(self._global_val_sums().items()):
            name = self.domains[idx] if idx < len(self.domains) else f"domain{idx}"
            self.log(f"val/{name}/loss", s / max(n, 1), add_dataloader_idx=False)
            total, tokens = total + s, tokens + n
        if tokens:
            self.log("val/loss", total / tokens, prog_bar=True, add_dataloader_idx=False)
        if not self.trainer.sanity_checking:
            self.last_val_step = self.global_step

    def _global_val_sums(self) -> dict[int, list[float]]:
        """Per validation loader: (loss x tokens, tokens) summed over the ranks. Under DDP, Lightning gives each
        rank a shard of every validation set (``DistributedSampler``): rank 0's own sums would be half the set.
        (That sampler pads a set whose size is not a multiple of the world size by repeating up to W-1 of its
        sequences; the default 32 per domain divides any power-of-two world up to 32.)"""
        if self.trainer.world_size == 1:
            return self._val_sums
        loaders = max(len(self.trainer.num_val_batches), max(self._val_sums, default=-1) + 1)
        sums = torch.zeros(loaders, 2, dtype=torch.float64, device=self.device)
        for idx, (s, n) in self._val_sums.items():
            sums[idx, 0], sums[idx, 1] = s, n
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        return {idx: [float(s), int(n)] for idx, (s, n) in enumerate(sums.tolist()) if n > 0}

    # -- NaN/inf guard --------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Refuse the optimizer step unless the loss of every micro-batch and every gradient are finite: weights,
        optimizer state and therefore every checkpoint stay those of the last good step. One fused max-abs norm
        over the gradients and one device sync per step (plus a scalar all-reduce with several processes, so that
        all ranks stop together)."""
        super().on_before_optimizer_step(optimizer)  # expert parallelism: complete and scale the expert grads first
        losses, self._losses = self._losses, []
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            grads = []  # fp16 loss scaling: inf gradients are expected now and then, the scaler skips those steps
        values = [loss.float().reshape(1) for loss, _ in losses]
        values += [n.float().reshape(1) for n in torch._foreach_norm(grads, ord=float("inf"))] if grads else []
        if not values:
            return
        bad = (~torch.isfinite(torch.cat([v.to(self.device) for v in values]))).any().float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bool(bad > 0):
            raise FloatingPointError(self._nonfinite_message(losses, optimizer))

    def _nonfinite_message(self, losses: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
                           optimizer: Optimizer) -> str:
        step = self.global_step
        names = {id(p): n for n, p in self.model.named_parameters()}
        bad_grads = nonfinite((names.get(id(p), "?"), p.grad) for g in optimizer.param_groups for p in g["params"]
                              if p.grad is not None)
        bad_loss = [parts for loss, parts in losses if not torch.isfinite(loss)]
        if bad_loss:
            what = "loss", ", ".join(f"{k}={float(v):.4g}" for k, v in bad_loss[0].items())
        elif bad_grads:
            what = "gradient", f"{len(bad_grads)} parameters, e.g. {', '.join(bad_grads[:3])}; the loss was finite"
        else:
            what = "loss or gradient", "on another rank"
        params = [p.detach() for p in self.model.parameters()]
        largest = float(torch.stack(torch._foreach_norm(params, ord=float("inf"))).max()) if params else 0.0
        return (
            f"NaN/inf {what[0]} at step {step} ({what[1]}): the step was not taken, weights and checkpoints are those "
            f"of the last good step (largest |weight| now {largest:.3g}; if that is large, the weights were ruined "
            f"before this step: resume from an earlier checkpoints/step*.ckpt or start over); lower the LR "
            f"(optimizer.lr), keep trainer.gradient_clip_val on, or check the data, and resume with ckpt_path=last "
            f"resume_allow_changes=[optimizer.lr] optimizer.lr=<lower>"
        )

    # -- optimisation --------------------------------------------------------------------------------------
    def _param_groups(self) -> list[list[torch.nn.Parameter]]:
        # weight decay on weights (linear, embedding, expert, router), none on RMSNorm gains; chosen by module
        # rather than by ndim so that it also holds for FSDP's flattened (1-D) parameter views
        norm_ids = {id(p) for m in self.model.modules() if isinstance(m, RMSNorm) for p in m.parameters(False)}
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if id(p) not in norm_ids]
        no_decay = [p for p in params if id(p) in norm_ids]
        return [decay, no_decay]

    def configure_optimizers(self) -> Any:
        decay, no_decay = self._param_groups()  # (on_load_checkpoint relies on this order)
        optimizer = self.make_optimizer([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.make_scheduler is None:
            return optimizer
        scheduler = self.make_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the run config (``training.build.load_model`` rebuilds the model from it); with EP, full experts."""
        if self.config is not None:
            checkpoint[CONFIG_KEY] = self.config
        self.gather_expert_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs before Lightning loads the weights and, later in ``fit``, the optimizer state from the same dict."""
        self.shard_expert_checkpoint(checkpoint)
