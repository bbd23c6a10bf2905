"""Expert parallelism in the Lightning path: the hooks a ``LightningModule`` needs to train an EP model.

``ExpertParallelHooks`` is mixed into ``training.lit.LitMoE`` (it expects ``self.model``, a ``Transformer``,
``self.expert_parallel``, the EP size W, and ``self._param_groups()``, the optimizer's parameter order). Under
Lightning's DDP strategy with D x W processes (``conf/parallel``, ``ep_size=W > 1``; D = 1 is EP over the whole
world, D > 1 hybrid EP x DP: EP groups of W consecutive ranks, see ``expert_parallel.expert_parallel_groups``):

- ``configure_model`` (the process group exists, the model is still the full, identically seeded one on every
  rank, DDP does not wrap it yet): create the EP and replica groups, keep this rank's E/W experts, swap in the
  all-to-all dispatcher, and tell DDP to leave the expert parameters alone (no broadcast at wrap time, no
  gradient averaging: DDP averages the dense grads over the whole world);
- ``on_before_optimizer_step``: expert grads / W, then averaged over the D replicas (see the maths in
  ``expert_parallel``). Once per optimizer step, not per backward, so gradient accumulation stays exact;
- ``configure_gradient_clipping``: EP-aware global-norm clipping (per-rank norms would make replicas drift);
- ``gather_expert_checkpoint`` / ``shard_expert_checkpoint`` (called from the module's checkpoint hooks):
  checkpoints hold full (gathered) expert tensors, for the weights *and* the optimizer state, and are re-sharded
  for the current EP size on load, so a run saved with EP=2 resumes with EP=1 (or 4, or 2 x 2 replicas, ...)
  with its exact optimizer state and loads anywhere with ``training.build.load_model``. Each EP group gathers
  within itself (the replicas hold identical experts and optimizer state); rank 0's copy is the one written,
  and on load every rank slices its EP rank's experts out of the full tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from moe_variants.parallel.expert_parallel import (
    apply_expert_parallel,
    clip_grad_norm_,
    ep_group_of,
    expert_parallel_groups,
    expert_parameter_names,
    expert_parameters,
    gather_expert_dim,
    is_expert_key,
    local_expert_range,
    moe_layers,
    scale_expert_grads,
    shard_state_dict,
)

EP_KEY = "moe_variants_expert_parallel"  # {"ep_size", "num_experts", "full": True}: how the checkpoint was saved


class ExpertParallelHooks:
    """Lightning hooks for expert parallelism; a no-op unless ``self.expert_parallel > 1``."""

    expert_replica_group: Any = None  # the ranks holding this rank's experts (hybrid EP x DP); None: no replicas
    ep_dispatcher: type | None = None  # an AllToAllDispatcher class (None: AllToAllDispatcher)

    @property
    def ep_active(self) -> bool:
        """Whether this module's model is expert-parallel (after ``configure_model``)."""

        return ep_group_of(self.model)[1] > 1

    def configure_model(self) -> None:
        """Shard the experts over this rank's EP group of ``expert_parallel`` ranks (> 1; the world or, for
        hybrid EP x DP, ``world / expert_parallel`` groups). Lightning calls this once the process group exists and
        before DDP wraps the module; later calls (``trainer.validate`` after ``fit``) find the model already
        sharded and do nothing."""
        if self.expert_parallel == 1 or self.ep_active:
            return

        W = self.expert_parallel
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"expert_parallel={W} needs {W} processes under trainer=ddp (no process group is initialised): "
                f"run with trainer=ddp trainer.devices={W} (or torchrun --nproc-per-node {W}), or "
                f"parallel.ep_size=1"
            )
        local_expert_range(self.model.args.num_experts, W, 0)  # num_experts % W: the error names the fix
        self._check_identical_experts()
        group, self.expert_replica_group = expert_parallel_groups(W)  # world % W: the error names the fix
        apply_expert_parallel(self.model, group, dispatcher=self.ep_dispatcher)
        # DDP must neither broadcast rank 0's shard over the others at wrap time nor average expert grads
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, expert_parameter_names(self.model, prefix="model.")
        )

    def _check_identical_experts(self) -> None:
        """Every rank must slice the same full model (same seed): DDP broadcasts the dense weights from rank 0 but,
        told to ignore the experts, would silently train shards of different initialisations otherwise."""

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

        # a shard whose experts got no token all step has no grad: zeros, as the whole fused tensor gets in one
        # process (so AdamW's decay and moments advance exactly as there)
        for p in expert_parameters(self.model):
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)
        # DDP averaged the dense grads; expert grads are sums over the EP group -> / W, then mean over the replicas
        scale_expert_grads(self.model, self.expert_replica_group)

    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        algorithm = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm"  # (Lightning: an enum)
        if self.ep_active and gradient_clip_val and str(algorithm).lower() == "norm":

            clip_grad_norm_(self.model, float(gradient_clip_val))  # the global norm over dense + all shards
            return
        # value clipping is element-wise: per-rank clipping is already the global one
        self.clip_gradients(
            optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
        )

    # -- checkpoints: full expert tensors on disk, this rank's shard in memory ---------------------------------
    def gather_expert_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With EP, replace this rank's expert shards (weights and optimizer state) in ``checkpoint`` by the full
        tensors. A collective: Lightning builds the checkpoint dict on every rank (rank 0 writes it)."""
        if not self.ep_active:
            return

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

    def shard_expert_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-shard a checkpoint (full expert tensors: weights and optimizer state) for this run's EP size.
        Runs before Lightning loads the weights and, later in ``fit``, the optimizer state from the same dict."""

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
                        f"by LitMoE.on_save_checkpoint; resume it with its own parallel.ep_size and world size"
                    )
                new[k] = v[lo:hi].clone() if W > 1 else v
            opt_state["state"][i] = new
