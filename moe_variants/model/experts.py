"""SwiGLU experts (dropless by default; optional capacity dropping), shared experts, and the token dispatcher.

The MoE feed-forward runs in three separable stages (so an expert-parallel all-to-all dispatcher can
replace the local one):

1. ``dispatch``: sort the N = T*K routed token copies by expert -> ``x_sorted`` (N, D) and
   ``tokens_per_expert`` (E,);
2. ``experts(x_sorted, tokens_per_expert)``: each expert's SwiGLU ``w2(silu(w1 x) * w3 x)`` on its
   contiguous group of rows;
3. ``combine``: undo the sort and sum the K outputs of each token weighted by the router's weights.

Copies that no expert computes (over an expert's capacity, :func:`over_capacity`, or a slot a variable-K router
leaves unused) are dispatched with ``keep_TK`` False: they sort after every expert's group, the experts skip them
and they add 0 in ``combine``. Without ``keep_TK`` (the default) every copy is computed (dropless).

Weights are stored fused and in the HF ``MixtralExperts`` layout so that both implementations share one
state dict: ``w13`` (E, 2F, D) holds ``w1`` (gate) rows [:F] and ``w3`` (up) rows [F:], ``w2`` (E, D, F).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class Dispatched:
    """Token copies sorted by expert, and what ``combine`` needs to undo the sort."""

    x: torch.Tensor  # (N, D) token copies grouped by expert
    tokens_per_expert: torch.Tensor  # (E,) int64 group sizes (on device; reading them syncs)
    order: torch.Tensor  # (N,) position in the flat (T*K) assignment list of each sorted row
    inverse: torch.Tensor  # (N,) the inverse permutation: sorted row of each flat (T*K) assignment
    keep: torch.Tensor | None  # (T, K) bool, False for copies that no expert computes; None: all computed


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i`` (a scatter; no sort)."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


class _GatherRows(torch.autograd.Function):
    """``x[index // repeat]`` where ``index`` is a permutation of ``range(len(x) * repeat)``: each row of x
    copied ``repeat`` times and permuted. The backward is a gather by ``inverse`` and a sum over the ``repeat``
    copies, where autograd's indexing backward would be an accumulating scatter (``index_put_(accumulate=True)``,
    a sort on CUDA): gathers both ways, deterministic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, repeat: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.repeat = repeat
        return x.index_select(0, index // repeat if repeat > 1 else index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        if ctx.repeat > 1:
            g = g.view(-1, ctx.repeat, *g.shape[1:]).sum(1)
        return g, None, None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` for a permutation ``perm`` (``inverse`` = :func:`inverse_permutation` of it), with a gather,
    not a scatter, in backward."""
    return _GatherRows.apply(x, perm, inverse, 1)


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64: how many routed copies each expert gets (a scatter-add: ``bincount`` would sync on CUDA)."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def expert_capacity(num_copies: int, num_experts: int, capacity_factor: float) -> int:
    """Copies one expert computes at most: ``ceil(capacity_factor * num_copies / num_experts)`` (Switch, GShard)."""
    return math.ceil(capacity_factor * num_copies / num_experts)


def over_capacity(expert_ids_BSK: torch.Tensor, num_experts: int, capacity_factor: float,
                  dropped_BSK: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S, K) bool: the copies beyond their expert's capacity :func:`expert_capacity` (of all B*S*K copies).

    Priority is position first, then row, then slot: every row's copies at position s queue before any copy at
    s + 1. So whether a copy is dropped depends only on tokens at positions <= its own (in any row), and dropping
    stays causal; a plain flat order (row first) would let row 0's later tokens drop row 1's earlier ones.
    Copies already in ``dropped_BSK`` (unused slots) take no capacity and are not reported again.
    """
    B, S, K = expert_ids_BSK.shape
    E = num_experts
    capacity = expert_capacity(B * S * K, E, capacity_factor)
    ids_N = expert_ids_BSK.transpose(0, 1).reshape(-1)  # position-major flat order: (S, B, K)
    if dropped_BSK is not None:
        ids_N = ids_N.masked_fill(dropped_BSK.transpose(0, 1).reshape(-1), E)  # id E: queues for no expert
    order = ids_N.argsort(stable=True)  # stable: the priority order inside each expert's queue
    counts = expert_counts(ids_N, E + 1)
    group_start = counts.cumsum(0) - counts
    sorted_ids = ids_N.index_select(0, order)
    rank_sorted = torch.arange(ids_N.numel(), device=ids_N.device) - group_start.index_select(0, sorted_ids)
    rank_N = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # place in its expert's queue
    over_N = (rank_N >= capacity) & (ids_N < E)
    return over_N.view(S, B, K).transpose(0, 1)


class Dispatcher:
    """A token dispatcher: ``dispatch`` token copies to their experts, ``combine`` the results back. ``run`` is the
    whole MoE feed-forward (dispatch -> experts -> combine); a dispatcher that interleaves communication with the
    expert compute (``parallel.overlap``) overrides it."""

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None = None,
                 plan: object = None) -> Dispatched:
        raise NotImplementedError

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, d: Dispatched) -> torch.Tensor:
        raise NotImplementedError

    def run(self, experts: Experts, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
            keep_TK: torch.Tensor | None = None, plan: object = None) -> torch.Tensor:
        """(T, D) MoE output: each token's K expert outputs summed with the router weights."""
        d = self.dispatch(x_TD, expert_ids_TK, keep_TK=keep_TK, plan=plan)
        return self.combine(experts(d.x, d.tokens_per_expert), weights_TK, d)


class LocalDispatcher(Dispatcher):
    """Dispatch and combine on one device (no communication)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, counts: torch.Tensor | None = None,
                 keep_TK: torch.Tensor | None = None, plan: object = None) -> Dispatched:
        """``counts``: :func:`expert_counts` of the kept copies when the caller has them already. ``keep_TK``:
        (T, K) bool, False for copies that no expert computes (sorted last, after every expert's group).
        ``plan``: ignored (expert-parallel dispatchers take split sizes planned for the forward; one device
        exchanges none)."""
        K = expert_ids_TK.shape[1]
        if keep_TK is not None:
            expert_ids_TK = expert_ids_TK.masked_fill(~keep_TK, self.num_experts)  # id E: after every group
            if counts is None:
                counts = expert_counts(expert_ids_TK, self.num_experts + 1)[: self.num_experts]
        # stable: token order kept inside each expert's group; int16 keys (ids <= E): a GPU radix sort then makes 2
        # passes over its 16 key bits instead of 8 over an int64's 64 (the sort was 0.4 ms of config A's step)
        flat_N = expert_ids_TK.reshape(-1)
        order = (flat_N.to(torch.int16) if self.num_experts < 2**15 else flat_N).argsort(stable=True)
        counts = expert_counts(expert_ids_TK, self.num_experts) if counts is None else counts
        inverse = inverse_permutation(order)
        x_ND = _GatherRows.apply(x_TD, order, inverse, K)  # x_TD[order // K]
        if keep_TK is not None:
            # rows past the last group belong to no expert; grouped_mm leaves their outputs and input gradients
            # undefined, so zero them here (gradient) and in combine (output)
            x_ND = torch.where(keep_TK.reshape(-1).index_select(0, order).unsqueeze(-1), x_ND, 0.0)
        return Dispatched(x=x_ND, tokens_per_expert=counts, order=order, inverse=inverse, keep=keep_TK)

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, d: Dispatched) -> torch.Tensor:
        T, K = weights_TK.shape
        y_TKD = permute_rows(y_ND, d.inverse, d.order).view(T, K, -1)  # back to the flat (T*K) order
        if d.keep is not None:  # a where, not a product: the skipped rows may hold non-finite garbage
            y_TKD = torch.where(d.keep.unsqueeze(-1), y_TKD, 0.0)
        # a deterministic weighted sum over the K copies (no atomics, unlike index_add_); fuses under compile
        return (y_TKD * weights_TK.to(y_TKD.dtype).unsqueeze(-1)).sum(dim=1)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's dtype where autocast is on for x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of ``h_N2F = [gate | up]`` (N, 2F) -> (N, F), with its derivative written out.

    Autograd's own backward of the two slices builds two zero-padded (N, 2F) gradients and adds them; under
    ``torch.compile`` that is one kernel that reads each input for both halves. Here the backward computes
    ``d_gate`` and ``d_up`` from one read of ``h`` and writes them side by side (one ``cat``). On an H200 the
    backward took 0.63 instead of 0.79 ms at (32768, 2 x 3584) and 5.2 instead of 8.4 ms at (32768, 2 x 14336)
    (``experiments/bench/optimizer_step.py``).
    With s = sigmoid(gate): d silu(gate) / d gate = s * (1 + gate * (1 - s))."""

    @staticmethod
    def forward(ctx, h_N2F: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h_N2F)
        gate, up = h_N2F.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_NF: torch.Tensor) -> torch.Tensor:
        (h_N2F,) = ctx.saved_tensors
        math_dtype = torch.promote_types(h_N2F.dtype, torch.float32)  # bf16 in fp32, as autograd's silu backward
        gate, up = h_N2F.to(math_dtype).chunk(2, dim=-1)
        grad, s = grad_NF.to(math_dtype), torch.sigmoid(gate)
        d_gate = grad * up * s * (1 + gate * (1 - s))
        d_up = grad * gate * s
        return torch.cat([d_gate, d_up], dim=-1).to(h_N2F.dtype)


def swiglu(h_N2F: torch.Tensor) -> torch.Tensor:
    """``silu(h[:, :F]) * h[:, F:]`` for the fused ``w13`` output (N, 2F) -> (N, F)."""
    return _SwiGLU.apply(h_N2F)


class Experts(nn.Module):
    """E SwiGLU experts with fused weights; subclasses choose how the grouped matmuls run."""

    def __init__(self, *, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim))  # (E, 2F, D)
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # (E, D, F)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=std)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """(N, D) rows grouped by expert -> (N, D). Rows past the last group (skipped copies) belong to no expert;
        their outputs are unspecified (the dispatcher masks them)."""
        raise NotImplementedError


class LoopExperts(Experts):
    """Reference: a plain loop over experts (clear, CPU friendly; syncs to read the group sizes)."""

    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        F_ = self.hidden_dim
        sizes = tokens_per_expert.tolist()
        outputs = []
        for e, rows in enumerate(x_ND[: sum(sizes)].split(sizes)):
            h = rows @ self.w13[e].t()  # (n_e, 2F)
            outputs.append((F.silu(h[:, :F_]) * h[:, F_:]) @ self.w2[e].t())  # (n_e, D)
        y = torch.cat(outputs) if outputs else x_ND.new_zeros(0, self.dim)
        skipped = x_ND.shape[0] - sum(sizes)  # rows past the last group: copies that no expert computes
        return torch.cat([y, y.new_zeros(skipped, self.dim)]) if skipped else y


class GroupedExperts(Experts):
    """Fast path: two grouped GEMMs over all experts at once (``torch.nn.functional.grouped_mm``), no host sync."""

    def __init__(self, **kw: int) -> None:
        super().__init__(**kw)
        if _grouped_mm is None:
            raise RuntimeError(
                f"torch {torch.__version__} has no grouped_mm (needs torch >= 2.8): use experts=loop"
            )

    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offs = tokens_per_expert.cumsum(0).to(torch.int32)  # group ends, stays on device
        # autocast does not cover grouped_mm: without this, bf16-mixed training (fp32 weights and fp32 norm
        # outputs) would run the expert GEMMs, most of the model's FLOPs, in fp32
        dtype = compute_dtype(x_ND)
        x_ND, w13, w2 = (t if t.dtype == dtype else t.to(dtype) for t in (x_ND, self.w13, self.w2))
        h = _grouped_mm(x_ND, w13.transpose(-2, -1), offs=offs)  # (N, 2F)
        return _grouped_mm(swiglu(h), w2.transpose(-2, -1), offs=offs)  # (N, D)


class SharedExperts(nn.Module):
    """DeepSeekMoE's shared experts (arXiv 2401.06066 §3.2): N always-active SwiGLU experts beside the routed ones,
    each with weight 1. N experts of width F are one SwiGLU of width N*F (the sum of SwiGLUs over disjoint hidden
    units), so they run as one dense SwiGLU ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, *, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        width = num_experts * hidden_dim
        self.w1 = nn.Linear(dim, width, bias=False)
        self.w3 = nn.Linear(dim, width, bias=False)
        self.w2 = nn.Linear(width, dim, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))


EXPERTS: dict[str, type[Experts]] = {"loop": LoopExperts, "grouped": GroupedExperts}


def make_experts(impl: str, **kw: int) -> Experts:
    """Build experts by implementation name (``loop`` or ``grouped``)."""
    if impl not in EXPERTS:
        raise ValueError(f"unknown experts implementation {impl!r}; choices: {sorted(EXPERTS)}")
    return EXPERTS[impl](**kw)
