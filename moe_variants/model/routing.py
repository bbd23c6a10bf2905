"""The router contract: what every router receives and returns.

A router maps hidden states ``x`` of shape (B, S, D) plus a :class:`RoutingContext` (token ids, positions,
span information) to a :class:`RouterOutput`: K expert ids and K combine weights per token. The MoE layer
never knows which router it holds.

Causality: the decision for position t may use only tokens <= t. ``RoutingContext`` exposes the token
history (``history_ids``) so that routers keyed on token ids can look back across decoding steps; anything
that reads past position t is a look-ahead and must be declared with ``Router.causal = False``.

Shape legend: B batch, S sequence, D model dim, E experts, K experts per token, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_variants.routers import spans


@dataclass
class RouterOutput:
    """What a router decides for one MoE layer.

    Attributes:
        expert_ids: (B, S, K) int64, distinct experts per token, in order of preference.
        weights: (B, S, K) float32 combine weights.
        logits: (B, S, E) float32 router logits, when the router has them (None for fixed routers).
        aux_losses: unweighted auxiliary losses by name (scalars); coefficients live in config.
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
    """Per-forward information that routers may read, computed once and shared by all layers.

    Args:
        history_ids: (B, S_hist) int64 token ids of the whole sequence so far; the current chunk is the
            last S positions (S_hist == S outside incremental decoding).
        positions: (B, S) int64 absolute positions of the current chunk.
        span_start: (B, S) bool, True where a new word span starts, for the current chunk. When None it is
            computed from ``word_start_table`` (a (V,) bool table from the tokenizer).
        word_start_table: (V,) bool, True for token ids that begin a word (see ``spans.word_start_table``).
        router_state: per-layer dicts that routers use to carry decisions across decoding steps
            (None outside incremental decoding).
    """

    def __init__(
        self,
        history_ids: torch.Tensor,
        positions: torch.Tensor,
        span_start: torch.Tensor | None = None,
        word_start_table: torch.Tensor | None = None,
        router_state: list[dict[str, Any]] | None = None,
    ) -> None:
        self.history_ids = history_ids
        self.positions = positions
        self.seq_len = positions.shape[1]
        self._span_start = span_start
        self.word_start_table = word_start_table
        self.router_state = router_state
        self._memo: dict[Any, torch.Tensor] = {}

    @property
    def token_ids(self) -> torch.Tensor:
        """(B, S) token ids of the current chunk."""
        return self.history_ids[:, -self.seq_len :]

    def memo(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Compute a derived quantity once per forward (shared across layers)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def history_span_start(self, span: spans.SpanDef = spans.SpanDef()) -> torch.Tensor:
        """(B, S_hist) span-start flags over the whole history."""

        def compute() -> torch.Tensor:
            if span.kind == "fixed":
                pos = torch.arange(self.history_ids.shape[1], device=self.history_ids.device)
                return spans.fixed_starts(pos, span.span_len).expand_as(self.history_ids)
            if self._span_start is not None and self.history_ids.shape[1] == self.seq_len:
                return self._span_start  # the data side's flags cover the whole history
            if self.word_start_table is None:
                raise ValueError(
                    "word spans need the tokenizer's word-start table: build the model with "
                    "word_start_table=<tokenizer's table> or pass span_start"
                )
            flags = spans.word_starts(self.history_ids, self.word_start_table)
            if self._span_start is not None:  # the data side's flags win for the current chunk
                flags = flags.clone()
                flags[:, -self.seq_len :] = self._span_start
            return flags

        return self.memo(("span_start", span), compute)

    def span_starts(self, span: spans.SpanDef = spans.SpanDef()) -> torch.Tensor:
        """(B, S) bool: True where a new span starts (current chunk)."""
        return self.history_span_start(span)[:, -self.seq_len :]

    def span_prefix_hash(self, max_len: int, span: spans.SpanDef = spans.SpanDef()) -> torch.Tensor:
        """(B, S) int64 hash of the span prefix ending at each token (causal)."""
        full = self.memo(
            ("prefix_hash", max_len, span),
            lambda: spans.prefix_hash(self.history_ids, self.history_span_start(span), max_len),
        )
        return full[:, -self.seq_len :]

    def span_full_hash(self, max_len: int, span: spans.SpanDef = spans.SpanDef()) -> torch.Tensor:
        """(B, S) int64 hash of the *whole* span containing each token. LOOKS AHEAD: not causal."""
        full = self.memo(
            ("full_hash", max_len, span),
            lambda: spans.full_span_hash(self.history_ids, self.history_span_start(span), max_len),
        )
        return full[:, -self.seq_len :]

    def state(self, layer_idx: int) -> dict[str, Any] | None:
        """This layer's router state for incremental decoding (None when not decoding)."""
        if self.router_state is None:
            return None
        return self.router_state[layer_idx]


@dataclass(frozen=True)
class LayerSpec:
    """What the model tells a router factory about the layer it builds a router for."""

    dim: int
    num_experts: int
    top_k: int
    vocab_size: int
    n_layers: int
    layer_idx: int
    resources: Any = None  # corpus-derived inputs (token counts, routing vocabularies): routers/resources.py


class Router(nn.Module):
    """Base class of routers. Subclasses implement ``forward(x, ctx) -> RouterOutput``.

    Class attributes:
        causal: False for routers (or variants: set it on the instance) that read tokens after position t;
            they refuse to build unless ``allow_lookahead=True`` and are labelled non-causal.
        hf_exportable: True when the router is exactly Mixtral's learned top-k gate.
    """

    causal: bool = True
    hf_exportable: bool = False

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


