"""Expert parallelism (EP): each rank of an EP group holds E / W experts; token copies travel to their experts'
ranks and back with all-to-all. Attention, norms, embeddings, the LM head and the router stay replicated and
data-parallel (every rank routes its own tokens with the same router weights).

Pieces, usable from a plain training loop or from Lightning hooks:

- :class:`AllToAllDispatcher`: drop-in for ``experts.LocalDispatcher`` (same ``dispatch`` / ``combine``);
- :func:`apply_expert_parallel`: turn a full model (built with the same seed on every rank) into this rank's
  EP model: slice each layer's fused ``w13``/``w2`` to experts ``[rank*E/W, (rank+1)*E/W)`` and swap in the
  all-to-all dispatcher;
- :func:`sync_expert_parallel_grads` (or :func:`scale_expert_grads` when DDP already averages the dense
  gradients) and :func:`clip_grad_norm_`: gradients equal to those of one process on the whole batch;
- :func:`gather_state_dict` / :func:`shard_state_dict` / :func:`load_state_dict_resharded`: checkpoints hold
  full (gathered) expert tensors, so they load on any world size, on one GPU and on CPU (``hf.save_hf`` too).

Gradient maths (EP group = the W data-parallel ranks; every rank holds B/W sequences with the same number of
labelled tokens). The single-process loss on the whole batch is ``L = (1/W) sum_r L_r`` with ``L_r`` the mean
loss of rank r's tokens, so the target gradient is ``(1/W) sum_r dL_r/dtheta``. Each rank runs backward on its
own ``L_r`` only:

- a dense (replicated) parameter gets ``dL_r/dtheta`` on rank r (the gradient of rank r's tokens reaches it
  back through the all-to-all); the mean over ranks (DDP's all-reduce / W) is the target;
- an expert parameter lives on one rank s, and the all-to-all backward brings it the gradient from *every*
  rank's tokens: ``sum_r dL_r/dW_s``. It must not be averaged across the EP group (the ranks hold different
  experts) and it is already a sum over ranks, so it is divided by W to get the target.

Hybrid EP x DP (:func:`expert_parallel_groups`): world = D x W ranks; EP group d is the W consecutive ranks
``[d*W, (d+1)*W)`` and holds every expert once; the replica group of EP rank s is the D ranks ``s, s+W, ...``
that hold the same experts. Every rank still gets its own batch shard (global batch = D x W shards). Expert
grads are divided by W (the sum over the EP group's tokens) and then averaged over the replica group
(``expert_replica_group``): ``(1/D) sum_d (1/W) sum_{r in d}`` is the mean over all D*W ranks; dense grads are
averaged over the whole world. If ranks hold different numbers of labelled tokens, the per-rank mean losses are
weighted equally, exactly as with plain DDP.

Only the exchange of per-expert group sizes syncs with the host (the row split sizes of the all-to-all must
be Python ints); everything else stays on the device. With routers that route by token ids alone (hash and
routing-vocabulary tables) :func:`plan_dispatch` exchanges every layer's counts at the start of the forward:
one exchange and one host sync per forward instead of one per layer.

Shape legend: T tokens on this rank, K experts per token, N = T*K routed copies, D model dim, E experts,
W EP group size, L = E / W local experts, R rows received by this rank.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moe_variants.model.experts import (
    Dispatched,
    Dispatcher,
    Experts,
    LocalDispatcher,
    expert_counts,
    inverse_permutation,
    permute_rows,
)
from moe_variants.model.routing import RoutingContext
from moe_variants.model.transformer import MoE, Transformer

EXPERT_KEY = re.compile(r"(^|\.)experts\.(w13|w2)$")  # state-dict keys of expert weights (any prefix)


class _AllToAll(torch.autograd.Function):
    """All-to-all of rows; the backward is the reverse all-to-all. Called through c10d directly: a functional
    collective took 0.30 ms of host time per call against 0.16-0.20 ms for the c10d op (H200 profile,
    results/bench/expert_parallel), and in the forward the host time after the split-size sync is time the GPU
    waits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad, input_splits, output_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> torch.Tensor:
    """Autograd-aware all-to-all of rows (backward is the reverse all-to-all).

    Under ``torch.compile``: ``_functional_collectives.all_to_all_single_autograd`` (what the deprecated
    ``torch.distributed.nn.functional.all_to_all_single`` points to), which dynamo traces; eager: :class:`_AllToAll`.
    """
    if not torch.compiler.is_compiling():
        return _AllToAll.apply(x, output_splits, input_splits, group)
    out = all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)
    return out.wait() if hasattr(out, "wait") else out


def local_expert_range(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """``[lo, hi)``: the global ids of the experts that EP rank ``ep_rank`` of ``ep_size`` holds."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}: choose an "
            f"expert-parallel size dividing num_experts (e.g. {_divisors(num_experts)}) or change model.num_experts"
        )
    n = num_experts // ep_size
    return ep_rank * n, (ep_rank + 1) * n


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class AllToAllDispatched(Dispatched):
    """``Dispatched`` plus what the return trip needs. ``x``/``tokens_per_expert`` are for the L *local* experts;
    ``order`` is, as in ``LocalDispatcher``, the flat (T*K) position of each copy this rank sent, sorted by
    global expert."""

    regroup: torch.Tensor  # (R,) received row (by source rank, then local expert) of each expert-grouped row
    ungroup: torch.Tensor  # (R,) its inverse: expert-grouped row of each received row
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank


@dataclass
class SplitPlan:
    """One layer's exchanged counts and all-to-all split sizes, known before its dispatch (:func:`plan_dispatch`).
    ``sent``/``received``: the dispatcher's (W, c) counts (:meth:`AllToAllDispatcher.send_counts`), row s for /
    from rank s; ``sizes``: its host split sizes (:meth:`AllToAllDispatcher.split_sizes`)."""

    sent: torch.Tensor
    received: torch.Tensor
    sizes: list[list[int]]


class AllToAllDispatcher(Dispatcher):
    """Dispatch token copies to the ranks holding their experts, combine the results back (same interface as
    ``LocalDispatcher``).

    dispatch: sort the T*K copies by global expert (= by destination rank), exchange the per-expert counts
    (``all_to_all_single`` on E ints: rank s learns how many rows it gets from each rank for each of its
    experts), send the rows, regroup the received rows by local expert. combine: undo the regrouping, send the
    rows back, undo the sort and sum each token's K outputs with the router weights. Copies with ``keep_TK``
    False (over capacity, unused slots) are sorted last and never sent; capacity is that of this rank's copies.
    Given a :class:`SplitPlan` (every layer's counts exchanged at once before the layers ran), dispatch skips
    the count exchange and the host sync.
    """

    def __init__(self, group: Any, num_experts: int) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.ep_size = dist.get_world_size(self.group)
        self.ep_rank = dist.get_rank(self.group)
        self.num_experts = num_experts
        lo, hi = local_expert_range(num_experts, self.ep_size, self.ep_rank)
        self.num_local_experts = hi - lo
        self._local = LocalDispatcher(num_experts)  # sort by global expert; unsort + weighted sum

    def send_counts(self, expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        """(W, L) copies this rank sends to each local expert of each rank: row s is what rank s receives."""
        if keep_TK is None:
            counts_E = expert_counts(expert_ids_TK, self.num_experts)
        else:  # skipped copies (id E) are counted apart and sent nowhere
            counts_E = expert_counts(expert_ids_TK.masked_fill(~keep_TK, self.num_experts), self.num_experts + 1)
            counts_E = counts_E[: self.num_experts]
        return counts_E.view(self.ep_size, self.num_local_experts)

    @staticmethod
    def split_sizes(sent: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """(2, W): rows sent to and received from each rank, from the (W, L) sent and received counts."""
        return torch.stack([sent.sum(1), received.sum(1)])

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None = None,
                 plan: SplitPlan | None = None) -> AllToAllDispatched:
        W, L = self.ep_size, self.num_local_experts
        d, received, send_splits, recv_splits = self._sort_and_split(x_TD, expert_ids_TK, keep_TK, plan)
        recv_counts = received.reshape(W * L)  # [s*L + l]
        x_send = d.x if keep_TK is None else d.x[: sum(send_splits)]  # skipped copies sit after every group
        x_recv = _all_to_all(x_send, recv_splits, send_splits, self.group)  # (R, D) by (source rank, local expert)
        R = sum(recv_splits)
        local_ids = torch.arange(L, device=x_TD.device).repeat(W).repeat_interleave(recv_counts, output_size=R)
        regroup = local_ids.argsort(stable=True)  # stable: by source rank, then token order, inside an expert
        ungroup = inverse_permutation(regroup)
        return AllToAllDispatched(
            x=permute_rows(x_recv, regroup, ungroup), tokens_per_expert=recv_counts.view(W, L).sum(0),
            order=d.order, inverse=d.inverse, keep=d.keep, regroup=regroup, ungroup=ungroup, send_splits=send_splits,
            recv_splits=recv_splits,
        )

    def _sort_and_split(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None,
                        plan: SplitPlan | None) -> tuple[Dispatched, torch.Tensor, list[int], list[int]]:
        """This rank's copies sorted by global expert (``LocalDispatcher``), the (W, L) counts it receives from
        each rank for each local expert, and the rows it sends to / receives from each rank (host ints)."""
        W, L = self.ep_size, self.num_local_experts
        if plan is None:
            sent = self.send_counts(expert_ids_TK, keep_TK)
            received = torch.empty_like(sent)  # [s, l]: rows rank s sends to my local expert l
            dist.all_to_all_single(received, sent, group=self.group)
            # the one host sync: all_to_all row splits must be Python ints. Copy them to the host asynchronously
            # and queue the local sort meanwhile, so that the GPU has work while the host waits and launches the
            # exchange
            sizes = _host_list_later(self.split_sizes(sent, received))
        else:
            _check_plan(plan, keep_TK)
            sent, received, sizes = plan.sent, plan.received, (lambda: plan.sizes)
        d = self._local.dispatch(x_TD, expert_ids_TK, sent.reshape(W * L), keep_TK)  # x (N, D) by global expert
        send_splits, recv_splits = sizes()
        return d, received, send_splits, recv_splits

    def combine(self, y_RD: torch.Tensor, weights_TK: torch.Tensor, d: AllToAllDispatched) -> torch.Tensor:
        y_recv = permute_rows(y_RD, d.ungroup, d.regroup)  # back to (source rank, local expert) order
        y_sorted = _all_to_all(y_recv, d.send_splits, d.recv_splits, self.group)  # (N, D) by global expert
        if d.keep is not None:  # rows for the skipped copies, masked in combine
            y_sorted = torch.cat([y_sorted, y_sorted.new_zeros(d.order.numel() - y_sorted.shape[0], y_sorted.shape[1])])
        return self._local.combine(y_sorted, weights_TK, d)


def _host_list_later(t: torch.Tensor) -> Callable[[], list]:
    """Start copying ``t`` to the host (asynchronously from a GPU); the returned function waits for the copy and
    gives ``t.tolist()``."""
    if not t.is_cuda:
        return t.tolist
    host = t.to("cpu", non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()

    def wait() -> list:
        ready.synchronize()
        return host.tolist()

    return wait


def _check_plan(plan: SplitPlan, keep_TK: torch.Tensor | None) -> None:
    if keep_TK is not None:
        raise ValueError("planned split sizes count every routed copy, but this layer drops copies (keep_TK): "
                         "plan_dispatch must not plan for routers or layers that drop copies")


def plan_dispatch(model: Transformer, ctx: RoutingContext) -> list[SplitPlan] | None:
    """Every MoE layer's split sizes for this forward, with one count exchange and one host sync for all layers
    (instead of one of each per layer), when each layer's router knows its expert ids from the token ids alone
    (``Router.ids_from_tokens``) and all layers dispatch with the same kind of all-to-all dispatcher over one
    group. None (each layer exchanges its own counts) otherwise: learned routers, capacity dropping (copies are
    dropped after routing), incremental decoding. :func:`apply_expert_parallel` installs it as the model's
    ``dispatch_planner``; every rank of the EP group must make the same choice, as they all build the same model.
    """
    layers = [block.feed_forward for block in model.layers]
    kind, group = type(layers[0].dispatcher), getattr(layers[0].dispatcher, "group", None)
    if ctx.router_state is not None or not issubclass(kind, AllToAllDispatcher) or not all(
            type(m.dispatcher) is kind and m.dispatcher.group is group and m.router.ids_from_tokens
            and m.capacity_factor is None for m in layers):
        return None
    with torch.no_grad():
        T = ctx.token_ids.numel()
        sent = torch.stack([m.dispatcher.send_counts(m.router.token_expert_ids(ctx).reshape(T, -1))
                            for m in layers])  # (layers, W, c)
        send_WLc = sent.transpose(0, 1).contiguous()  # all_to_all_single splits dim 0: by destination rank
        recv_WLc = torch.empty_like(send_WLc)  # by source rank
        dist.all_to_all_single(recv_WLc, send_WLc, group=group)
        received = recv_WLc.transpose(0, 1)  # (layers, W, c)
        # the one host sync of the forward
        sizes = torch.stack([kind.split_sizes(s, r) for s, r in zip(sent, received)]).tolist()
    return [SplitPlan(sent=s, received=r, sizes=z) for s, r, z in zip(sent, received, sizes)]


def expert_parallel_groups(ep_size: int) -> tuple[Any, Any]:
    """This rank's (EP group, expert replica group) for world = D x ``ep_size`` (see the module docstring): EP
    groups of ``ep_size`` consecutive ranks, replica groups of the D ranks with the same EP rank. ``ep_size`` =
    world: (the world, None), no new group. A collective: every rank of the world calls it, in the same order.
    Raises ``ValueError`` naming the fix when ``ep_size`` does not divide the world."""
    world = dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(
            f"expert-parallel size {ep_size} does not divide the {world} processes (world = data-parallel "
            f"replicas x EP size): choose an EP size dividing {world} (e.g. {_divisors(world)}) or launch a "
            f"multiple of {ep_size} processes"
        )
    if ep_size == world:
        return dist.group.WORLD, None
    replicas = world // ep_size
    # new_subgroups_by_enumeration creates every listed group on every rank (as new_group must be) and returns
    # the one holding this rank
    ep_group, _ = dist.new_subgroups_by_enumeration(
        [list(range(d * ep_size, (d + 1) * ep_size)) for d in range(replicas)])
    replica_group, _ = dist.new_subgroups_by_enumeration(
        [list(range(s, world, ep_size)) for s in range(ep_size)])
    return ep_group, replica_group


# -- applying EP to a model ----------------------------------------------------------------------------------
def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def ep_group_of(model: nn.Module) -> tuple[Any, int, int]:
    """(group, ep_size, ep_rank) of a model's expert parallelism; (None, 1, 0) without EP."""
    for moe in moe_layers(model):
        if isinstance(moe.dispatcher, AllToAllDispatcher):
            return moe.dispatcher.group, moe.dispatcher.ep_size, moe.dispatcher.ep_rank
    return None, 1, 0


def apply_expert_parallel(model: nn.Module, group: Any = None, dispatcher: type | None = None) -> nn.Module:
    """Make ``model`` (the full model, initialised identically on every rank: same seed) this rank's EP model,
    in place: each MoE layer keeps experts ``[rank*E/W, (rank+1)*E/W)`` of the EP ``group`` (default: the
    world) and dispatches with :class:`AllToAllDispatcher`. Returns ``model``.

    Slicing a full initialisation keeps EP runs bit-identical to single-process ones at step 0; the full expert
    weights exist briefly on every rank (build on CPU first for models whose experts do not fit one GPU).
    ``dispatcher``: an ``AllToAllDispatcher`` class (default it; ``dedup.OneCopyPerRankDispatcher`` sends a token
    once per destination rank). The model's ``dispatch_planner`` becomes :func:`plan_dispatch` (one count exchange
    per forward for routers that route by token ids; set it to None for one exchange per layer).
    """
    dispatcher = dispatcher or AllToAllDispatcher
    group = group if group is not None else dist.group.WORLD
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = moe_layers(model)
    if not layers:
        raise ValueError("apply_expert_parallel: the model has no MoE layers")
    for moe in layers:
        if isinstance(moe.dispatcher, AllToAllDispatcher):
            raise ValueError("apply_expert_parallel: the model is already expert-parallel")
        full: Experts = moe.experts
        lo, hi = local_expert_range(full.num_experts, W, rank)
        local = type(full)(dim=full.dim, hidden_dim=full.hidden_dim, num_experts=hi - lo)
        local.to(device=full.w13.device, dtype=full.w13.dtype)
        with torch.no_grad():
            local.w13.copy_(full.w13[lo:hi])
            local.w2.copy_(full.w2[lo:hi])
        local.train(full.training)
        moe.experts = local
        moe.dispatcher = dispatcher(group, full.num_experts)
    for m in model.modules():
        if isinstance(m, Transformer):
            m.dispatch_planner = plan_dispatch
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that are local to an EP rank (the sharded experts of every MoE layer)."""
    return [p for moe in moe_layers(model) if isinstance(moe.dispatcher, AllToAllDispatcher)
            for p in moe.experts.parameters()]


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The replicated (data-parallel) parameters: everything but the EP experts."""
    local = {id(p) for p in expert_parameters(model)}
    return [p for p in model.parameters() if id(p) not in local]


def expert_parameter_names(model: nn.Module, prefix: str = "") -> list[str]:
    """Names (with ``prefix``, e.g. ``"model."`` inside a LightningModule) of the EP expert parameters: what
    DDP must not average (``module._ddp_params_and_buffers_to_ignore``)."""
    local = {id(p) for p in expert_parameters(model)}
    return [prefix + n for n, p in model.named_parameters() if id(p) in local]


# -- gradients -----------------------------------------------------------------------------------------------
@torch.no_grad()
def scale_expert_grads(model: nn.Module, expert_replica_group: Any = None) -> None:
    """Expert grads: divide by the EP size W (the all-to-all backward already summed every rank's tokens,
    each rank's loss being its own mean), then average over ``expert_replica_group`` (ranks holding the same
    experts in hybrid EP x DP; None = no replicas). Call after backward when DDP averages the dense grads."""
    _, W, _ = ep_group_of(model)
    grads = [p.grad for p in expert_parameters(model) if p.grad is not None]
    if not grads:
        return
    torch._foreach_div_(grads, float(W))
    if expert_replica_group is not None and dist.get_world_size(expert_replica_group) > 1:
        _all_reduce_mean(grads, expert_replica_group)


@torch.no_grad()
def sync_expert_parallel_grads(model: nn.Module, dense_group: Any = None, expert_replica_group: Any = None) -> None:
    """Gradient sync for a plain loop (no DDP): average dense grads over ``dense_group`` (default: the world),
    scale expert grads (see :func:`scale_expert_grads`). Afterwards every rank's dense grads and its expert
    shard's grads equal those of one process on the whole (global) batch. Dense params without a grad get
    zeros (every rank must all-reduce the same tensors)."""
    group = dense_group if dense_group is not None else dist.group.WORLD
    dense = [p for p in dense_parameters(model) if p.requires_grad]
    for p in dense:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if dense and dist.get_world_size(group) > 1:
        _all_reduce_mean([p.grad for p in dense], group)
    scale_expert_grads(model, expert_replica_group)


def _by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


def _all_reduce_mean(tensors: list[torch.Tensor], group: Any) -> None:
    """One flat all-reduce per dtype (few large messages instead of one per parameter)."""
    n = dist.get_world_size(group)
    for ts in _by_dtype(tensors).values():
        flat = _flatten_dense_tensors(ts)
        dist.all_reduce(flat, group=group)
        flat.div_(n)
        for t, synced in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(synced)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """EP-aware global gradient-norm clipping (after the grad sync). The norm of the whole model is
    ``sqrt(|dense|^2 + sum over EP ranks |expert shard|^2)``; clipping by a per-rank norm would scale the
    replicated dense grads differently on each rank and make the replicas drift apart. Returns the norm."""
    group, W, _ = ep_group_of(model)
    dense = [p.grad for p in dense_parameters(model) if p.grad is not None]
    experts = [p.grad for p in expert_parameters(model) if p.grad is not None]
    if not dense and not experts:
        return torch.zeros(())

    def sq(grads: list[torch.Tensor]) -> torch.Tensor:
        device = (dense or experts)[0].device
        if not grads:
            return torch.zeros((), device=device)
        # a few fused kernels per dtype, not a chain of kernels per gradient
        norms = [torch.stack(torch._foreach_norm(group)).float() for group in _by_dtype(grads).values()]
        return torch.cat(norms).pow(2).sum()

    expert_sq = sq(experts)
    if W > 1:
        dist.all_reduce(expert_sq, group=group)
    total = (sq(dense) + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in dense + experts:
        g.mul_(coef.to(g.dtype))
    return total


# -- state dicts ---------------------------------------------------------------------------------------------
def is_expert_key(key: str) -> bool:
    return EXPERT_KEY.search(key) is not None


def shard_state_dict(
    state: dict[str, torch.Tensor], num_experts: int, ep_size: int, ep_rank: int
) -> dict[str, torch.Tensor]:
    """A full state dict -> the one of EP rank ``ep_rank`` of ``ep_size`` (expert tensors sliced on dim 0;
    everything else shared, not copied)."""
    lo, hi = local_expert_range(num_experts, ep_size, ep_rank)
    out = {}
    for k, v in state.items():
        if is_expert_key(k):
            _check_rows(k, v, num_experts, num_experts, ep_size)
            v = v[lo:hi]
        out[k] = v
    return out


def _check_rows(key: str, t: torch.Tensor, expected: int, num_experts: int, ep_size: int) -> None:
    rows = t.shape[0]
    if rows == expected:
        return
    if rows and num_experts % rows == 0:
        saved = num_experts // rows
        raise ValueError(
            f"{key} holds {rows} of the {num_experts} experts: it was saved with ep_size={saved} (one rank's "
            f"shard), this run uses ep_size={ep_size}: gather it with "
            f"moe_variants.parallel.expert_parallel.gather_state_dict on {saved} ranks (checkpoints should hold "
            f"full expert tensors), or run with ep_size={saved}"
        )
    raise ValueError(
        f"{key} has {rows} experts but the model has num_experts={num_experts}: the checkpoint is from another "
        f"model config"
    )


@torch.no_grad()
def gather_expert_dim(shard: torch.Tensor, group: Any) -> torch.Tensor:
    """This rank's (E/W, ...) expert shard -> the full (E, ...) tensor, all-gathered over the EP ``group`` along
    the expert dim (a collective: every rank of the group must call it, in the same order)."""
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts)


@torch.no_grad()
def gather_state_dict(model: nn.Module, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """The full (single-process) state dict of an EP model: expert shards all-gathered along the expert dim
    (a collective: every rank of the EP group must call it; every rank gets the result). Without EP, the
    model's own state dict."""
    group, W, _ = ep_group_of(model)
    state = model.state_dict()
    out = {}
    for k, v in state.items():
        if W > 1 and is_expert_key(k):
            v = gather_expert_dim(v, group)
        if isinstance(v, torch.Tensor):  # (routers may keep non-tensor ``_extra_state``)
            v = v.detach().cpu() if to_cpu else v.detach()
        out[k] = v
    return out


def load_state_dict_resharded(
    model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True
) -> Any:
    """Load a full state dict (what checkpoints hold) into ``model`` whatever its EP size: expert tensors are
    sliced to this rank's experts. A shard saved by one rank of an EP run loads only into the same rank of the
    same EP size; any other expert shape fails with a ``ValueError`` saying how to fix it."""
    _, W, rank = ep_group_of(model)
    E = model.args.num_experts if hasattr(model, "args") else None
    if E is None:
        raise ValueError("load_state_dict_resharded needs a Transformer (model.args.num_experts)")
    local = E // W
    lo, hi = local_expert_range(E, W, rank)
    out = {}
    for k, v in state.items():
        if is_expert_key(k):
            if v.shape[0] == E:
                v = v[lo:hi]
            else:
                _check_rows(k, v, local, E, W)  # a per-rank shard of this run's EP size is accepted as is
        out[k] = v
    return model.load_state_dict(out, strict=strict)
