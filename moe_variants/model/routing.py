"""The router contract: what every router receives and returns.

A router maps hidden states ``x`` of shape (B, S, D) plus a :class:`RoutingContext` (token ids, positions,
decoding state) to a :class:`RouterOutput`: K expert ids and K combine weights per token. The MoE layer
never knows which router it holds, and the context carries only what every router may need: anything one
kind of router needs (word spans, corpus tables) lives with that router (``moe_variants.routers``).

Causality: the decision for position t may use only tokens <= t. ``RoutingContext`` exposes the token
history (``history_ids``) so that routers keyed on token ids can look back across decoding steps; anything
that reads past position t is a look-ahead and must be declared with ``Router.causal = False``.

Shape legend: B batch, S sequence (current chunk), S_hist history, D model dim, E experts, K experts per token,
V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class RouterOutput:
    """What a router decides for one MoE layer.

    Attributes:
        expert_ids: (B, S, K) int64, K distinct experts per token, in order of preference.
        weights: (B, S, K) float32 combine weights, summing to 1 over K.
        logits: (B, S, E) float32 logits of the gate that *chose* the experts, or None when no gate chose them
            (tables, hashes; a gate that only weights experts chosen otherwise reports None here, so that router
            entropy is only ever measured where a gate decides).
        aux_losses: unweighted auxiliary losses by name (scalars); their coefficients live in ``conf/loss``.
        dropped: (B, S, K) bool, True for copies that no expert computes (they add 0 to the token's output):
            slots a variable-K router leaves unused (expert choice; their ids are distinct fillers, weight 0)
            and copies over their expert's capacity (set by the MoE layer). None: every copy is computed.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: torch.Tensor | None = None


class RoutingContext:
    """Per-forward information that every router may read, shared by all layers.

    Args:
        history_ids: (B, S_hist) int64 token ids of the whole sequence so far, from position 0; the current chunk
            is the last S positions (S_hist == S outside incremental decoding).
        positions: (B, S) int64 absolute positions of the current chunk.
        router_state: per-layer dicts that routers use to carry decisions across decoding steps
            (None outside incremental decoding).
        dispatch_plans: per-layer split sizes that an expert-parallel model planned for this forward before the
            layers ran (``Transformer.dispatch_planner``); None: every layer's dispatcher plans its own.
    """

    def __init__(
        self,
        history_ids: torch.Tensor,
        positions: torch.Tensor,
        router_state: list[dict[str, Any]] | None = None,
        dispatch_plans: list[Any] | None = None,
    ) -> None:
        self.history_ids = history_ids
        self.positions = positions
        self.seq_len = positions.shape[1]
        self.router_state = router_state
        self.dispatch_plans = dispatch_plans

    @property
    def token_ids(self) -> torch.Tensor:
        """(B, S) token ids of the current chunk."""
        return self.history_ids[:, -self.seq_len :]

    def previous_ids(self, none_id: int) -> torch.Tensor:
        """(B, S) id of the token before each position of the current chunk; ``none_id`` at position 0."""
        prev = self.history_ids.new_full(self.history_ids.shape, none_id)
        prev[:, 1:] = self.history_ids[:, :-1]
        return prev[:, -self.seq_len :]

    def state(self, layer_idx: int) -> dict[str, Any] | None:
        """This layer's router state for incremental decoding (None when not decoding)."""
        if self.router_state is None:
            return None
        return self.router_state[layer_idx]

    def dispatch_plan(self, layer_idx: int) -> Any:
        """This layer's planned dispatch split sizes (None when not planned)."""
        if self.dispatch_plans is None:
            return None
        return self.dispatch_plans[layer_idx]


@dataclass(frozen=True)
class LayerSpec:
    """What the model tells a router factory about the layer it builds a router for."""

    dim: int
    num_experts: int
    top_k: int
    vocab_size: int
    n_layers: int
    layer_idx: int


class Router(nn.Module):
    """Base class of routers. Subclasses implement ``forward(x, ctx) -> RouterOutput``.

    Class attributes:
        causal: False for routers (or variants: set it on the instance) that read tokens after position t;
            they refuse to build unless ``allow_lookahead=True`` and are labelled non-causal.
        hf_exportable: True when the router is exactly Mixtral's learned top-k gate.
        needs_resources: True for routers built from tokenizer or corpus statistics: their factory is called
            with ``resources=`` (see ``moe_variants.routers.resources``); everything such a router derives from
            them is a buffer, so a checkpoint rebuilds it without the corpus.
        load_balance_group: see :meth:`balance_group`.
        ids_from_tokens: True for routers whose expert ids follow from the token ids alone (never from the hidden
            states): :meth:`token_expert_ids` gives them before any layer runs, so that an expert-parallel model
            exchanges every layer's split sizes at once (``parallel.expert_parallel.plan_dispatch``).
    """

    causal: bool = True
    hf_exportable: bool = False
    needs_resources: bool = False
    # a data-parallel process group: routers that report ``load_balance`` compute its statistics over every rank
    # of it in training (``parallel.load_balance.use_global_load_balance``); None: over this process's tokens
    load_balance_group: Any = None
    ids_from_tokens: bool = False

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        if not 1 <= spec.top_k <= spec.num_experts:
            raise ValueError(
                f"top_k={spec.top_k} must satisfy 1 <= top_k <= num_experts={spec.num_experts}: "
                f"lower model.num_experts_per_tok or raise model.num_experts"
            )
        self.spec = spec
        self.num_experts = spec.num_experts
        self.top_k = spec.top_k
        self.layer_idx = spec.layer_idx

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_expert_ids(self, ctx: RoutingContext) -> torch.Tensor:
        """(B, S, K) int64 expert ids of the current chunk from ``ctx`` alone, exactly those ``forward`` returns;
        only for routers with ``ids_from_tokens``, outside incremental decoding (``ctx.router_state`` None)."""
        raise NotImplementedError(f"{type(self).__name__} routes by its hidden states: ids_from_tokens is False")

    def balance_group(self) -> Any:
        """The process group to compute load-balance statistics over (pass it to ``losses.load_balance_loss``):
        ``load_balance_group`` in training; None (this process's tokens) in eval, whose aux losses train nothing
        and whose forwards (validation, generation) need not run in step on every rank."""
        return self.load_balance_group if self.training else None

    def describe(self) -> str:
        """A short label for logs, e.g. ``topk(k=2)``."""
        return f"{type(self).__name__}(k={self.top_k})"

    def refuse_lookahead(self, allow_lookahead: bool) -> None:
        """Call at the end of ``__init__``: a non-causal variant builds only when look-ahead is allowed."""
        if not self.causal and not allow_lookahead:
            raise ValueError(
                f"router {self.describe()} looks ahead: its decision at position t reads tokens after t, so a "
                f"causal LM trained with it cheats. Set router.allow_lookahead=true to build it anyway; the run "
                f"is then labelled non-causal."
            )


RouterFactory = Callable[[LayerSpec], Router]
"""Builds one layer's router from its ``LayerSpec`` (a Hydra ``_partial_`` router config is one)."""


