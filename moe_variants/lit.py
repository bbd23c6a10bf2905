"""``LitMoE``: the thin Lightning wrapper around ``Transformer``: loss composition, logging, optimisation.

No model code and no routing maths here: the model is injected, aux-loss coefficients come from ``conf/loss``,
routing metrics are computed by ``callbacks.RoutingMetrics`` from what ``training_step`` returns.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from moe_variants.losses import compose_loss
from moe_variants.model import RMSNorm, Transformer

CONFIG_KEY = "moe_variants_config"  # where the resolved run config lives in a checkpoint


def _warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1
) -> LRScheduler:
    """Linear warmup to the base lr over ``warmup_steps``, then cosine to ``min_lr_ratio * lr`` at ``total_steps``.

    A ``functools.partial`` (not a lambda or an object with state) so that a resumed run takes the horizon from
    its config, and the scheduler state dict stays picklable.
    """
    if not 0.0 <= min_lr_ratio <= 1.0 or warmup_steps < 0 or total_steps <= 0:
        raise ValueError(
            f"warmup_cosine needs 0 <= min_lr_ratio <= 1, warmup_steps >= 0, total_steps > 0; got "
            f"{min_lr_ratio}, {warmup_steps}, {total_steps}"
        )
    fn = functools.partial(
        _warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
    return LambdaLR(optimizer, fn)


class LitMoE(L.LightningModule):
    """Args:
    model: the Transformer (router and experts already injected).
    optimizer: partial optimizer, called with parameter groups.
    scheduler: partial scheduler called with the optimizer (stepped every optimizer step), or None.
    loss_coefficients: aux-loss name -> coefficient (``conf/loss``).
    domains: validation domain names, index = dataloader_idx.
    config: the resolved run config, stored in every checkpoint (``checkpoint.load_model`` rebuilds from it).
    """

    def __init__(
        self,
        model: Transformer,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[[Optimizer], LRScheduler] | None,
        loss_coefficients: Mapping[str, float],
        domains: Sequence[str] = ("all",),
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.loss_coefficients = dict(loss_coefficients)
        self.domains = list(domains)
        self.config = dict(config) if config is not None else None
        self._val_sums: dict[int, list[float]] = {}  # dataloader_idx -> [sum of token losses, tokens]
        self.last_val_step: int | None = None  # global step of the last completed validation

    # -- training ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        out = self.model(batch["input_ids"], labels=batch["labels"], span_start=batch.get("span_start"))
        loss, parts = compose_loss(out.lm_loss, out.routing, self.loss_coefficients)
        if not torch.isfinite(loss):  # before backward/optimizer step, so no weight is touched
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise FloatingPointError(
                f"NaN/inf loss at step {self.global_step} ({detail}): lower the LR (optimizer.lr), "
                f"check the data batch, or keep trainer.gradient_clip_val on"
            )
        B = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=B)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=B)
        # for RoutingMetrics (this step only, detached: nothing keeps the graph alive)
        routing = [
            {"expert_ids": r.expert_ids.detach(), "logits": None if r.logits is None else r.logits.detach(),
             "aux": {k: v.detach() for k, v in r.aux_losses.items()}}
            for r in out.routing
        ]
        return {"loss": loss, "routing": routing, "doc_start": batch.get("doc_start")}

    # -- validation: token-weighted per domain and overall --------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self.model(batch["input_ids"], labels=batch["labels"], span_start=batch.get("span_start"))
        n = int((batch["labels"] != -100).sum())
        acc = self._val_sums.setdefault(dataloader_idx, [0.0, 0])
        acc[0] += float(out.lm_loss) * n
        acc[1] += n

    def on_validation_epoch_end(self) -> None:
        total, tokens = 0.0, 0
        for idx, (s, n) in sorted(self._val_sums.items()):
            name = self.domains[idx] if idx < len(self.domains) else f"domain{idx}"
            self.log(f"val/{name}/loss", s / max(n, 1), add_dataloader_idx=False)
            total, tokens = total + s, tokens + n
        if tokens:
            self.log("val/loss", total / tokens, prog_bar=True, add_dataloader_idx=False)
        if not self.trainer.sanity_checking:
            self.last_val_step = self.global_step

    # -- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        # weight decay on weights (linear, embedding, expert, router), none on RMSNorm gains; chosen by module
        # rather than by ndim so that it also holds for FSDP's flattened (1-D) parameter views
        norm_ids = {id(p) for m in self.model.modules() if isinstance(m, RMSNorm) for p in m.parameters(False)}
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if id(p) not in norm_ids]
        no_decay = [p for p in params if id(p) in norm_ids]
        optimizer = self.make_optimizer([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.make_scheduler is None:
            return optimizer
        scheduler = self.make_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.config is not None:
            checkpoint[CONFIG_KEY] = self.config
