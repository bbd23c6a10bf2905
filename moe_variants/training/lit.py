"""``LitMoE``: the thin Lightning wrapper around ``Transformer``: loss composition, logging, optimisation.

No model code and no routing maths here: the model is injected, aux-loss coefficients come from ``conf/loss``,
routing metrics are computed by ``callbacks.RoutingMetrics`` from what ``training_step`` returns, the LR schedule
is ``training.schedule``, and expert parallelism comes from ``parallel.lightning.ExpertParallelHooks``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from moe_variants.model.losses import compose_loss
from moe_variants.model.routing import Router
from moe_variants.model.transformer import RMSNorm, Transformer
from moe_variants.parallel.dedup import OneCopyPerRankDispatcher
from moe_variants.parallel.lightning import ExpertParallelHooks
from moe_variants.parallel.load_balance import check_load_balance_scope, use_global_load_balance
from moe_variants.parallel.overlap import OverlappedDispatcher
from moe_variants.training.checkpoint import CONFIG_KEY, nonfinite
from moe_variants.training.interrupt import SaveOnStop
from moe_variants.training.optim import (
    build_optimizer,
    check_optimizer_impl,
    lr_copy,
    place_step_counters,
    set_lr,
)


@dataclass
class StepCheck:
    """The weight check one optimizer step left on the device (0-dim tensors), read later in one sync."""

    step: int  # global step of the optimizer step (as the error messages count)
    bad: torch.Tensor  # bool: NaN/inf weights or a blow-up
    before: torch.Tensor  # largest |weight| before the step
    after: torch.Tensor  # and after it


class LitMoE(ExpertParallelHooks, L.LightningModule):
    """Args:
    model: the Transformer (router and experts already injected).
    optimizer: partial optimizer, called with parameter groups.
    scheduler: partial scheduler called with the optimizer (stepped every optimizer step), or None.
    loss_coefficients: aux-loss name -> coefficient (``conf/loss``).
    domains: validation domain names, index = dataloader_idx.
    config: the resolved run config, stored in every checkpoint (``checkpoint.load_model`` rebuilds from it).
    expert_parallel: EP size W; > 1 shards the experts over the W ranks of the (DDP) world in ``configure_model``.
    router_lr_scale: the routers' learning rate is the optimizer's x this (``conf/config.yaml``); 0 freezes every
        router at its init (AdamW's decay is scaled by the lr too). Any other value than 1 puts the router
        parameters into parameter groups of their own (see :meth:`_param_groups`).
    load_balance_scope: ``"local"``: load-balance statistics over each process's tokens; ``"global"``: over all
        processes' (``parallel.load_balance``), set up in ``configure_model``.
    one_copy_per_rank: under expert parallelism, send a token once per destination rank
        (``parallel.dedup.OneCopyPerRankDispatcher``) instead of once per expert.
    overlap: under expert parallelism, overlap the token exchanges with the expert compute
        (``parallel.overlap.OverlappedDispatcher``); not together with ``one_copy_per_rank``.
    optimizer_impl: how the optimizer's update runs: ``fused``, ``foreach`` or ``compiled`` (``training.optim``;
        ``training.build`` resolves the config's ``auto``); None: as ``optimizer`` builds it.
    """

    BLOW_UP = 100.0  # a step that multiplies the largest |weight| by more than this (and past it) has diverged

    def __init__(
        self,
        model: Transformer,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[[Optimizer], LRScheduler] | None,
        loss_coefficients: Mapping[str, float],
        domains: Sequence[str] = ("all",),
        config: Mapping[str, Any] | None = None,
        expert_parallel: int = 1,
        router_lr_scale: float = 1.0,
        load_balance_scope: str = "local",
        one_copy_per_rank: bool = False,
        overlap: bool = False,
        optimizer_impl: str | None = None,
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
        self._max_weight: torch.Tensor | None = None  # largest |weight| after the last optimizer step (0-dim)
        self._last_step_check: StepCheck | None = None  # the last optimizer step's weight check, not read yet
        self._state_checked_step: int | None = None  # global step where the optimizer state was last seen finite
        self.expert_parallel = int(expert_parallel)
        if self.expert_parallel < 1:
            raise ValueError(f"expert_parallel must be >= 1, got {expert_parallel}")
        self.router_lr_scale = check_router_lr_scale(router_lr_scale)
        self.load_balance_scope = check_load_balance_scope(load_balance_scope)
        if one_copy_per_rank and overlap:
            raise ValueError("parallel.one_copy_per_rank=true and parallel.overlap=true choose two different "
                             "expert-parallel dispatchers: set one of them to false")
        # an AllToAllDispatcher class for configure_model (None: AllToAllDispatcher itself)
        self.ep_dispatcher = OneCopyPerRankDispatcher if one_copy_per_rank else (
            OverlappedDispatcher if overlap else None)
        if optimizer_impl is not None and check_optimizer_impl(optimizer_impl) == "auto":
            raise ValueError("LitMoE takes a resolved optimizer_impl, not auto (training.optim.resolve_optimizer_impl)")
        self.optimizer_impl = optimizer_impl

    def configure_model(self) -> None:
        """Expert parallelism (``ExpertParallelHooks``), then, with a global load-balance scope and several
        processes, routers that all-reduce their balance statistics over the world."""
        super().configure_model()
        if self.load_balance_scope == "global" and dist.is_available() and dist.is_initialized():
            use_global_load_balance(self.model)

    # -- training ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        out = self.model(batch["input_ids"], labels=batch["labels"])
        loss, parts = compose_loss(out.lm_loss, out.routing, self.loss_coefficients)
        # checked together with the gradients before the optimizer step (on_before_optimizer_step): one sync
        self._losses.append((loss.detach(), {k: v.detach() for k, v in parts.items()}))
        if self._logs_this_step():  # a value logged at another step is never written: its host time is saved
            B = batch["input_ids"].shape[0]
            # no prog_bar=True: Lightning would read the value to the host after every batch, a GPU sync (the
            # progress bar reads train/loss itself where it shows it: console.StepProgressBar); the LR as a tensor
            # filled on the device: self.log copies a host float with torch.tensor(lr, device=...), which syncs too
            self.log("train/loss", loss, batch_size=B)
            self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=B)
            lr = self.optimizers().param_groups[0]["lr"]  # a device tensor under optimizer_impl=compiled
            lr = lr_copy(lr) if isinstance(lr, torch.Tensor) else torch.full((), lr, device=self.device)
            self.log("train/lr", lr, batch_size=B)
        # for RoutingMetrics (this step only, detached: nothing keeps the graph alive)
        routing = [
            {"expert_ids": r.expert_ids.detach(), "logits": None if r.logits is None else r.logits.detach(),
             "aux": {k: v.detach() for k, v in r.aux_losses.items()}, "dropped": r.dropped}
            for r in out.routing
        ]
        return {"loss": loss, "routing": routing, "doc_start": batch.get("doc_start")}

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes the values logged in this training step: when the step about to end is a
        multiple of ``trainer.log_every_n_steps`` (``global_step + 1``, counted before the optimizer step), or the
        trainer is stopping (as Lightning's ``should_update_logs`` decides; ``callbacks.RoutingMetrics`` counts the
        same steps after the optimizer step)."""
        n = self.trainer.log_every_n_steps
        return bool(n) and ((self.global_step + 1) % n == 0 or self.trainer.should_stop)

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
    # One device -> host read per optimizer step: each step's checks are queued on the device, and the check of
    # the step about to be taken (finite losses and gradients) is read together with that of the step before
    # (finite, not blown-up weights). Before any checkpoint is built, and at the end of training, the last step's
    # check is read at once, with the optimizer state: no checkpoint ever holds a refused step.
    def on_fit_start(self) -> None:
        self._last_step_check, self._max_weight, self._state_checked_step = None, None, None

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Refuse the optimizer step unless the loss of every micro-batch and every gradient are finite: weights,
        optimizer state and therefore every checkpoint stay those of the last good step. The check the previous
        step left (:meth:`optimizer_step`) is read with it: one fused max-abs norm over the gradients and one
        device sync per step (plus one small all-reduce with several processes, so that all ranks stop together)."""
        super().on_before_optimizer_step(optimizer)  # expert parallelism: complete and scale the expert grads first
        losses, self._losses = self._losses, []
        last, self._last_step_check = self._last_step_check, None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            grads = []  # fp16 loss scaling: inf gradients are expected now and then, the scaler skips those steps
        values = [loss.float().reshape(1) for loss, _ in losses]
        values += [n.float().reshape(1) for n in torch._foreach_norm(grads, ord=float("inf"))] if grads else []
        if not values and last is None:
            return
        this_bad = (~torch.isfinite(torch.cat([v.to(self.device) for v in values]))).any() if values else None
        # with several processes, SaveOnStop's "a rank got Ctrl-C/SIGTERM" rides on the same all-reduce and read
        stop = self._save_on_stop() if self.trainer.world_size > 1 else None
        stop_flag = None if stop is None else torch.full((), float(stop.requested), device=self.device)
        last_bad, this_bad, stop_any = self._read_flags(None if last is None else last.bad, this_bad, stop_flag)
        if stop is not None:
            stop.agree(self.global_step + 1, stop_any)  # the step this optimizer step ends at
        if last_bad:  # first: this step's NaN would only be a consequence of the ruined weights
            raise FloatingPointError(self._blow_up_message(getattr(optimizer, "optimizer", optimizer), last))
        if this_bad:
            raise FloatingPointError(self._nonfinite_message(losses, optimizer))

    def _save_on_stop(self) -> SaveOnStop | None:
        return next((cb for cb in self.trainer.callbacks if isinstance(cb, SaveOnStop)), None)

    def _read_flags(self, *flags: torch.Tensor | None) -> list[bool]:
        """0-dim device flags (nonzero = bad; None = nothing checked) -> bools, in one device -> host read; with
        several processes a flag is set where any rank set it (one all-reduce)."""
        stacked = torch.stack([torch.zeros((), device=self.device) if f is None else f.float().to(self.device)
                               for f in flags])  # (F,); no tensor made from a host value: that would sync too
        if self.trainer.world_size > 1:
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        return (stacked > 0).tolist()  # one copy of the (F,) flags to the host

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

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The step, then a check of the weights it left, queued on the device and read with the next step's check
        (:meth:`on_before_optimizer_step`) or, if a checkpoint comes first, before that checkpoint is built
        (:meth:`check_last_step`): finite weights and no blow-up (the largest |weight| grown more than ``BLOW_UP``
        x in this one step, and to more than ``BLOW_UP``). Finite gradients do not rule either out: AdamW's decay
        multiplies every weight by 1 - lr x weight_decay. One fused max-abs norm over the weights (4 bytes a
        parameter in fp32), no sync.

        The optimizer state (AdamW's two moments, twice the bytes of the weights) is checked only where a
        checkpoint is built and at the end of training (:meth:`check_last_step`), and that keeps the guarantee
        that no checkpoint holds a NaN/inf state or weights: a NaN moment makes the weights of the next step that
        updates that parameter NaN (the update is m / (sqrt(v) + eps)), which the weight check of that step
        catches; an inf second moment (grad^2 overflowing it) leaves the weights finite (the update is 0), so it is
        the checkpoint's own check that refuses it, naming the steps since the state was last seen finite."""
        params = [p.detach() for p in self.model.parameters()]
        if self._max_weight is None:  # first step of this fit; later steps reuse the last step's value
            self._max_weight = torch.stack(torch._foreach_norm(params, ord=float("inf"))).max() if params else None
            self._state_checked_step = self.global_step  # fresh, or loaded from a checkpoint that was checked
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if not params:
            return
        before, after = self._max_weight, torch.stack(torch._foreach_norm(params, ord=float("inf"))).max()
        bad = ~torch.isfinite(after) | (after > self.BLOW_UP * before.clamp(min=1.0))
        self._last_step_check = StepCheck(self.global_step, bad, before, after)
        self._max_weight = after

    def check_last_step(self, when: str = "at the end of training") -> None:
        """Read the last optimizer step's queued weight check now and check the optimizer state for NaN/inf
        (one sync); raise ``FloatingPointError`` naming the step if either is bad (``when``: where it was found, for
        the message). Runs before every checkpoint is built (:meth:`on_save_checkpoint`: ``ModelCheckpoint``,
        ``SaveOnStop``'s saves at the end, on Ctrl-C or SIGTERM, any ``trainer.save_checkpoint``), before each
        validation during training and at the end of training."""
        last, self._last_step_check = self._last_step_check, None
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        state = [v.detach() for opt in optimizers for s in opt.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0]
        state_bad = None
        if state:
            state_bad = ~torch.isfinite(torch.stack(torch._foreach_norm(state, ord=float("inf")))).all()
        if last is None and state_bad is None:
            return
        last_bad, state_bad = self._read_flags(None if last is None else last.bad, state_bad)
        if last_bad:
            raise FloatingPointError(self._blow_up_message(optimizers[0] if optimizers else None, last))
        if state_bad:
            raise FloatingPointError(self._state_message(optimizers[0], when))
        self._state_checked_step = self.global_step

    def on_train_end(self) -> None:
        self.check_last_step()  # a run that ends without a checkpoint of its last step still reports a bad one

    def on_validation_start(self) -> None:  # no validation losses (nor churn) of weights the guard would refuse
        self.check_last_step(f"before the validation at step {self.global_step}")

    def _blow_up_message(self, optimizer: Optimizer | None, check: StepCheck) -> str:
        named = list(self.model.named_parameters())
        state = optimizer.state if optimizer is not None else {}
        ruined = nonfinite(named + [(f"{n} (optimizer state {k})", v) for n, p in named
                                    for k, v in state.get(p, {}).items()])
        before, after = float(check.before), float(check.after)
        if ruined:
            what = f"NaN/inf weights or optimizer state ({len(ruined)} tensors, e.g. {', '.join(ruined[:3])})"
        elif math.isfinite(after) and after > self.BLOW_UP * max(before, 1.0):
            what = f"the weights blew up (the largest |weight| went from {before:.3g} to {after:.3g})"
        else:
            what = "NaN/inf weights or a blow-up on another rank"
        return (
            f"{what} after the optimizer step at step {check.step}, with a finite loss and finite gradients: "
            f"this step was not saved, the checkpoints are those of the last good step; lower the LR (optimizer.lr; "
            f"with AdamW keep optimizer.lr x optimizer.weight_decay well below 1) and resume with ckpt_path=last "
            f"resume_allow_changes=[optimizer.lr] optimizer.lr=<lower>"
        )

    def _state_message(self, optimizer: Optimizer, when: str) -> str:
        named = list(self.model.named_parameters())
        ruined = nonfinite([(f"{n} ({k})", v) for n, p in named for k, v in optimizer.state.get(p, {}).items()])
        ruined = ruined or ["on another rank"]
        since = self._state_checked_step if self._state_checked_step is not None else 0
        return (
            f"NaN/inf optimizer state ({', '.join(ruined[:3])}{' ...' if len(ruined) > 3 else ''}) found {when}, "
            f"with finite weights: an optimizer step after step {since} (where the state was last checked, at a "
            f"checkpoint or the start) made it (AdamW's second moment overflows when grad^2 does); nothing of it was "
            f"saved, the checkpoints are those of step {since} or before; lower the LR (optimizer.lr), keep "
            f"trainer.gradient_clip_val on, and resume with ckpt_path=last resume_allow_changes=[optimizer.lr] "
            f"optimizer.lr=<lower>"
        )

    # -- optimisation --------------------------------------------------------------------------------------
    def _param_groups(self) -> list[list[torch.nn.Parameter]]:
        """The optimizer's parameter groups, in its order: [decay, no_decay], and with ``router_lr_scale`` != 1
        also [router_decay, router_no_decay] (the parameters of every ``Router`` module, lr x the scale). At scale
        1 the routers stay in the first two groups, so checkpoints written before the scale existed (two groups)
        resume unchanged."""
        # weight decay on weights (linear, embedding, expert, router), none on RMSNorm gains; chosen by module
        # rather than by ndim so that it also holds for FSDP's flattened (1-D) parameter views
        norm_ids = {id(p) for m in self.model.modules() if isinstance(m, RMSNorm) for p in m.parameters(False)}
        router_ids = set()
        if self.router_lr_scale != 1.0:
            router_ids = {id(p) for m in self.model.modules() if isinstance(m, Router) for p in m.parameters()}
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = []
        for routers in (False, True) if router_ids else (False,):
            mine = [p for p in params if (id(p) in router_ids) == routers]
            groups += [[p for p in mine if id(p) not in norm_ids], [p for p in mine if id(p) in norm_ids]]
        return groups

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer as the run config sets it: decay / no-decay groups, then the routers' two groups (if any)
        at ``router_lr_scale`` x lr (the scheduler scales each group's own lr), updated by ``optimizer_impl``."""
        groups = self._param_groups()  # (on_load_checkpoint relies on this order)
        groups = [{"params": g, **({} if i % 2 == 0 else {"weight_decay": 0.0})} for i, g in enumerate(groups)]
        optimizer = build_optimizer(self.make_optimizer, groups, self.optimizer_impl)
        for group in optimizer.param_groups[2:]:
            set_lr(group, group["lr"] * self.router_lr_scale)
        return optimizer

    def configure_optimizers(self) -> Any:
        optimizer = self._make_optimizer()
        if self.make_scheduler is None:
            return optimizer
        scheduler = self.make_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """The optimizer's settings come from the run config, also on resume: Lightning restores the param groups
        (lr, weight_decay, betas, ...) and the scheduler's base LRs as the checkpoint saved them, which would
        silently undo a change made explicit with ``resume_allow_changes`` (``optimizer.lr=<lower>`` after a
        blow-up). Without such a change the values are the saved ones, bit for bit. So do the implementation flags
        (``optimizer_impl``: a run may resume with another one), with the step counters moved where it keeps them."""
        optimizer = self.trainer.optimizers[0]
        fresh = self._make_optimizer()  # no state: the configured settings only (a tensor lr: fresh's own tensor)
        for live, want in zip(optimizer.param_groups, fresh.param_groups, strict=True):
            live.update({k: v for k, v in want.items() if k != "params"})
        place_step_counters(optimizer)
        schedulers = self.trainer.lr_scheduler_configs
        if not schedulers:
            return
        scheduler = schedulers[0].scheduler
        scheduler.base_lrs = [lr_copy(g["lr"]) for g in fresh.param_groups]  # the scheduler writes group["lr"]
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["initial_lr"] = lr_copy(base)
        if not isinstance(scheduler, LambdaLR):
            raise TypeError(f"{type(scheduler).__name__}: LitMoE recomputes the LR on resume for a LambdaLR only")
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            set_lr(group, base * factor(scheduler.last_epoch))  # what LambdaLR computes at this step

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the run config (``training.build.load_model`` rebuilds the model from it); with EP, full experts.
        First the NaN/inf guard's check of the last step (:meth:`check_last_step`): a refused step is never saved."""
        self.check_last_step(f"before writing the checkpoint of step {self.global_step}")
        if self.config is not None:
            checkpoint[CONFIG_KEY] = self.config
        self.gather_expert_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs before Lightning loads the weights and, later in ``fit``, the optimizer state from the same dict."""
        self.shard_expert_checkpoint(checkpoint)


def check_router_lr_scale(scale: Any) -> float:
    """``router_lr_scale`` as a float, or a ``ValueError`` naming the fix (negative, NaN/inf or not a number)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale < float("inf"):
        raise ValueError(
            f"router_lr_scale={scale!r}: the routers' learning rate is optimizer.lr x router_lr_scale; set a finite "
            f"number >= 0 (1 = the same lr as the rest, 0 = routers frozen at their init)"
        )
    return float(scale)
