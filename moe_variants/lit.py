"""``LitMoE``: the thin Lightning wrapper around ``Transformer``: loss composition, logging, optimisation.

No model code and no routing maths here: the model is injected, aux-loss coefficients come from ``conf/loss``,
routing metrics are computed by ``callbacks.RoutingMetrics`` from what ``training_step`` returns.

Expert parallelism (``conf/parallel``, ``expert_parallel=W > 1``, under Lightning's DDP strategy with W
processes) is wired in through hooks, using ``moe_variants.parallel``:

- ``configure_model`` (the process group exists, the model is still the full, identically seeded one on every
  rank, DDP does not wrap it yet): keep this rank's E/W experts, swap in the all-to-all dispatcher, and tell
  DDP to leave the expert parameters alone (no broadcast at wrap time, no gradient averaging);
- ``on_before_optimizer_step``: expert grads / W (see the maths in ``parallel``). Once per optimizer step,
  not per backward, so gradient accumulation stays exact;
- ``configure_gradient_clipping``: EP-aware global-norm clipping (per-rank norms would make replicas drift);
- ``on_save_checkpoint`` / ``on_load_checkpoint``: checkpoints hold full (gathered) expert tensors, for the
  weights *and* the optimizer state, and are re-sharded for the current EP size on load, so a run saved with
  EP=2 resumes with EP=1 (or 4, ...) with its exact optimizer state and loads anywhere with
  ``checkpoint.load_model``.
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
EP_KEY = "moe_variants_expert_parallel"  # {"ep_size", "num_experts", "full": True}: how the checkpoint was saved


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
        self.expert_parallel = int(expert_parallel)
        if self.expert_parallel < 1:
            raise ValueError(f"expert_parallel must be >= 1, got {expert_parallel}")

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

    # -- expert parallelism ----------------------------------------------------------------------------------
    @property
    def ep_active(self) -> bool:
        """Whether this module's model is expert-parallel (after ``configure_model``)."""
        from moe_variants.parallel import ep_group_of

        return ep_group_of(self.model)[1] > 1

    def configure_model(self) -> None:
        """Shard the experts over the world (``expert_parallel`` > 1). Lightning calls this once the process
        group exists and before DDP wraps the module; later calls (``trainer.validate`` after ``fit``) find the
        model already sharded and do nothing."""
        if self.expert_parallel == 1 or self.ep_active:
            return
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from moe_variants import parallel as P

        W = self.expert_parallel
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"expert_parallel={W} needs {W} processes under trainer=ddp (no process group is initialised): "
                f"run with trainer=ddp trainer.devices={W} (or torchrun --nproc-per-node {W}), or "
                f"parallel.expert_parallel=1"
            )
        world = dist.get_world_size()
        if world != W:
            raise ValueError(
                f"parallel.expert_parallel={W} but the DDP world has {world} processes: expert parallelism spans "
                f"the whole world (hybrid EP x DP is not wired into the Lightning path); set "
                f"parallel.expert_parallel={world} or launch {W} processes"
            )
        P.local_expert_range(self.model.args.num_experts, W, 0)  # num_experts % W: the error names the fix
        self._check_identical_experts()
        P.apply_expert_parallel(self.model)
        # DDP must neither broadcast rank 0's shard over the others at wrap time nor average expert grads
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, P.expert_parameter_names(self.model, prefix="model.")
        )

    def _check_identical_experts(self) -> None:
        """Every rank must slice the same full model (same seed): DDP broadcasts the dense weights from rank 0 but,
        told to ignore the experts, would silently train shards of different initialisations otherwise."""
        import torch.distributed as dist

        from moe_variants.parallel import moe_layers

        with torch.no_grad():
            ws = [w for moe in moe_layers(self.model) for w in (moe.experts.w13, moe.experts.w2)]
            stats = torch.stack([torch.stack([w.double().sum(), w.double().square().sum()]) for w in ws]).flatten()
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        stats = stats.to(device)
        lo, hi = stats.clone(), stats.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise ValueError(
                "expert parallelism: the ranks built different expert weights; every rank must build the same "
                "full model from the same seed before it is sharded (do not vary seed per rank)"
            )

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        if not self.ep_active:
            return
        from moe_variants.parallel import expert_parameters, scale_expert_grads

        # a shard whose experts got no token all step has no grad: zeros, as the whole fused tensor gets in one
        # process (so AdamW's decay and moments advance exactly as there)
        for p in expert_parameters(self.model):
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)
        scale_expert_grads(self.model)  # DDP averaged the dense grads; expert grads are sums over ranks -> / W

    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        algorithm = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm"  # (Lightning: an enum)
        if self.ep_active and gradient_clip_val and str(algorithm).lower() == "norm":
            from moe_variants.parallel import clip_grad_norm_

            clip_grad_norm_(self.model, float(gradient_clip_val))  # the global norm over dense + all shards
            return
        # value clipping is element-wise: per-rank clipping is already the global one
        self.clip_gradients(
            optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
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
        """Store the run config; with EP, replace this rank's expert shards (weights and optimizer state) by the
        full tensors. A collective: Lightning builds the checkpoint dict on every rank (rank 0 writes it)."""
        if self.config is not None:
            checkpoint[CONFIG_KEY] = self.config
        if not self.ep_active:
            return
        from moe_variants.parallel import ep_group_of, gather_expert_dim, is_expert_key

        group, W, _ = ep_group_of(self.model)
        state = checkpoint["state_dict"]
        for k in sorted(k for k in state if is_expert_key(k)):  # the same keys, in the same order, on every rank
            state[k] = gather_expert_dim(state[k], group).cpu()  # (E, ...): one full layer at a time on the device
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        for optimizer, opt_state in zip(optimizers, checkpoint.get("optimizer_states", [])):
            self._gather_optimizer_state(optimizer, opt_state)
        checkpoint[EP_KEY] = {"ep_size": W, "num_experts": self.model.args.num_experts, "full": True}

    def _gather_optimizer_state(self, optimizer: Optimizer, opt_state: dict[str, Any]) -> None:
        """In ``opt_state`` (an ``optimizer.state_dict()``), the expert entries shaped like the local shard
        (AdamW's moments; not the scalar ``step``) -> the full (E, ...) tensors, all-gathered over the EP group.
        The per-parameter dicts are replaced, never mutated: they are the live optimizer's."""
        import torch.distributed as dist

        from moe_variants.parallel import ep_group_of, expert_parameters, gather_expert_dim

        group, W, _ = ep_group_of(self.model)
        experts = {id(p) for p in expert_parameters(self.model)}
        params = [p for g in optimizer.param_groups for p in g["params"]]  # state_dict index order
        todo = []
        for i, p in enumerate(params):
            entry = opt_state["state"].get(i)
            if id(p) in experts and entry is not None:
                todo += [(i, k) for k, v in sorted(entry.items())
                         if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape]
        layouts: list[Any] = [None] * W
        dist.all_gather_object(layouts, todo, group=group)  # same entries everywhere, or collectives would hang
        if any(lay != todo for lay in layouts):
            raise RuntimeError(
                "expert parallelism: the ranks' optimizer states hold different expert entries; cannot gather "
                "them into one checkpoint"
            )
        for i, k in todo:
            full = gather_expert_dim(opt_state["state"][i][k], group).cpu()
            opt_state["state"][i] = {**opt_state["state"][i], k: full}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-shard a checkpoint (full expert tensors: weights and optimizer state) for this run's EP size.
        Runs before Lightning loads the weights and, later in ``fit``, the optimizer state from the same dict."""
        from moe_variants.parallel import ep_group_of, local_expert_range, moe_layers, shard_state_dict

        E = self.model.args.num_experts
        _, W, rank = ep_group_of(self.model)
        saved = (checkpoint.get(EP_KEY) or {}).get("ep_size", 1)
        state = checkpoint.get("state_dict")
        if state is not None:
            checkpoint["state_dict"] = shard_state_dict(state, E, W, rank)  # also checks each expert tensor is full
        opt_states = checkpoint.get("optimizer_states") or []
        if not opt_states:
            return
        lo, hi = local_expert_range(E, W, rank)
        params = [p for g in self._param_groups() for p in g]  # = the saved optimizer's index order
        expert_ids = {id(p) for moe in moe_layers(self.model) for p in (moe.experts.w13, moe.experts.w2)}
        opt_state = opt_states[0]
        n_saved = sum(len(g["params"]) for g in opt_state.get("param_groups", []))
        if n_saved != len(params):
            return  # another optimizer layout: torch's load_state_dict reports the mismatch itself
        for i, p in enumerate(params):
            entry = opt_state["state"].get(i)
            if id(p) not in expert_ids or entry is None:
                continue
            new = dict(entry)
            for k, v in entry.items():
                if not isinstance(v, torch.Tensor) or v.dim() == 0:
                    continue
                if v.shape[0] != E or v.shape[1:] != p.shape[1:]:
                    raise ValueError(
                        f"optimizer state {k!r} of expert parameter #{i} has shape {tuple(v.shape)}, expected the "
                        f"full ({E}, {', '.join(map(str, p.shape[1:]))}) (checkpoint saved with ep_size={saved}, "
                        f"this run uses ep_size={W}): the checkpoint holds per-rank optimizer shards, not written "
                        f"by LitMoE.on_save_checkpoint; resume it with its own parallel.expert_parallel and world size"
                    )
                new[k] = v[lo:hi].clone() if W > 1 else v
            opt_state["state"][i] = new
