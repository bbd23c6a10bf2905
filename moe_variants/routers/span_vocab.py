"""Routing-vocabulary span routers (after MoWE, arXiv 2311.10768): a span key looked up in a fixed vocabulary of
frequent keys gives a routing id, and a fixed per-layer table maps the routing id to K experts.

A causal LM decides at piece t of a word knowing only the word's prefix so far (its pieces up to t), never the
whole word. What each router keys on, and what its vocabulary counts, follows from that:

- :class:`FirstPieceVocabRouter` (``conf/router/span_first_piece.yaml``): the decision is taken at the span's
  first piece and held for the span, so all it can know is that first piece. Its vocabulary is over *first
  pieces*: the ``vocab_size`` most frequent span-initial tokens of the corpus.
- :class:`PrefixVocabRouter` (``conf/router/span_prefix.yaml``): it decides again at every piece from the prefix
  seen so far (the pieces of one word may then go to different experts). Its vocabulary is over *word prefixes*:
  every prefix occurrence is counted, so every prefix of a word in the vocabulary is in it too, and a frequent
  word is reached piece by piece.
- :class:`WholeWordRouter` (``conf/router/span_whole_word.yaml``): MoWE's own key, the complete word, over a
  vocabulary of whole words. At the first piece this reads the rest of the word: it LOOKS AHEAD in a causal LM,
  refuses to build unless ``allow_lookahead=true``, and its runs are labelled non-causal.

Keys outside the vocabulary share ``num_buckets`` hashed routing ids. ``learned_top > 0`` hands the tokens whose
routing id is among the ``learned_top`` most frequent to a learned top-k gate instead (per token for prefixes,
at the span's first piece and held for first pieces). :meth:`VocabRouter.routing_shares` reports which share of
tokens each source routes. Combine weights: ``uniform`` or ``learned`` (a gate scores the chosen experts; K >= 2).
No gate decides the routing of most tokens, so these routers report ``logits=None`` (no router entropy).

Departures from MoWE: MoWE's routing vocabulary has about a million words over thousands of small experts and
routes a token by its whole word; here the vocabulary is ``vocab_size`` keys (16384 by default) over the model's
E experts, and the causal routers key on what a causal LM can know (first piece, prefix).
"""

from __future__ import annotations

from typing import Any

import torch

from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext
from moe_variants.routers.gates import check_weights, chosen_expert_weights, topk_gate
from moe_variants.routers.resources import (
    ROUTING_VOCAB_VERSION,
    corpus_table,
    lookup_routing_ids,
    require,
    word_span_kinds,
)
from moe_variants.routers.spans import SpanDef, Spans, full_span_hash, hold, prefix_hash
from moe_variants.routers.tables import layer_seed, random_expert_table


class VocabRouter(Router):
    """What the routing-vocabulary routers share: the vocabulary buffers, the lookup, the expert table and the
    weights. Subclasses say which key a token is routed by (:meth:`keys`) and what the vocabulary counts."""

    needs_resources = True  # the tokenizer's piece kinds and the corpus's vocabulary
    unit: str  # what the vocabulary counts: first_piece | prefix | whole_word (routers.resources.UNITS)

    def __init__(
        self, spec: LayerSpec, *, spans: str, span_len: int, vocab_size: int, num_buckets: int, max_span_len: int,
        learned_top: int, weights: str, seed: int, resources: Any, allow_lookahead: bool = False,
    ) -> None:
        super().__init__(spec)
        check_weights(weights, spec.top_k)
        if not 0 <= learned_top <= vocab_size or vocab_size < 1 or num_buckets < 1 or max_span_len < 1:
            raise ValueError(f"need vocab_size >= 1, num_buckets >= 1, max_span_len >= 1 and 0 <= learned_top <= "
                             f"vocab_size; got {vocab_size}, {num_buckets}, {max_span_len}, {learned_top}")
        self.span = SpanDef(spans, span_len)
        self.vocab_size, self.max_span_len, self.num_buckets, self.learned_top, self.weights_kind = (
            vocab_size, max_span_len, num_buckets, learned_top, weights)
        self.refuse_lookahead(allow_lookahead)  # first: before anything needs resources or builds a vocabulary
        self.spans = Spans(self.span, word_span_kinds(self.span, resources, spec.vocab_size))
        self.tokenizer_fingerprint = ""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            vocab = require(resources, "a routing vocabulary").routing_vocab(self.unit, vocab_size, max_span_len,
                                                                             self.span)
            self.tokenizer_fingerprint = vocab.tokenizer_fingerprint
            return torch.stack([vocab.hashes, vocab.ranks])

        hashes, ranks = corpus_table(resources, (2, vocab_size), build).unbind(0)
        self.register_buffer("vocab_hashes", hashes.contiguous())  # (vocab_size,) sorted key hashes
        self.register_buffer("vocab_ranks", ranks.contiguous())  # (vocab_size,) routing id of each
        table = random_expert_table(vocab_size + num_buckets, spec.num_experts, spec.top_k,
                                    layer_seed(seed, spec.layer_idx))
        self.register_buffer("expert_table", table)  # (routing ids, K)
        self.ids_from_tokens = learned_top == 0  # else the gate picks the experts of the most frequent ids
        needs_gate = weights == "learned" or learned_top > 0
        self.gate = torch.nn.Linear(spec.dim, spec.num_experts, bias=False) if needs_gate else None

    # The routing vocabulary belongs to one tokenizer: checkpoints carry its fingerprint.
    def get_extra_state(self) -> dict[str, Any]:
        return {"tokenizer_fingerprint": self.tokenizer_fingerprint, "routing_vocab_version": ROUTING_VOCAB_VERSION}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("tokenizer_fingerprint", "")
        if self.tokenizer_fingerprint and saved and saved != self.tokenizer_fingerprint:
            raise ValueError(
                f"the checkpoint's routing vocabulary was built for tokenizer {saved[:12]}, but this run uses "
                f"{self.tokenizer_fingerprint[:12]}: use the checkpoint's tokenizer or rebuild the routing vocabulary"
            )
        if state.get("routing_vocab_version") != ROUTING_VOCAB_VERSION:
            raise ValueError(
                f"the checkpoint's routing vocabulary has format version {state.get('routing_vocab_version')}, this "
                f"code reads version {ROUTING_VOCAB_VERSION} (span definition or hashing changed): retrain the run"
            )
        self.tokenizer_fingerprint = saved or self.tokenizer_fingerprint

    def keys(self, ctx: RoutingContext) -> torch.Tensor:  # pragma: no cover - abstract
        """(B, S) int64 key hash of every token of the current chunk."""
        raise NotImplementedError

    def routing_ids(self, ctx: RoutingContext) -> torch.Tensor:
        """(B, S) routing ids: vocabulary ranks in [0, vocab_size), hashed buckets from vocab_size on."""
        return lookup_routing_ids(self.keys(ctx), self.vocab_hashes, self.vocab_ranks, self.num_buckets)

    def token_expert_ids(self, ctx: RoutingContext) -> torch.Tensor:
        """(B, S, K) the table's experts of every token's routing id, held as :meth:`decide` holds them: the
        routing itself (only when ``learned_top == 0``: ``ids_from_tokens``)."""
        if not self.ids_from_tokens:
            raise NotImplementedError(f"{self.describe()} routes its learned_top most frequent routing ids by a "
                                      f"learned gate: ids_from_tokens is False")
        return self.decide(self.expert_table[self.routing_ids(ctx)], None, ctx)[0]

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        rid = self.routing_ids(ctx)  # (B, S)
        expert_ids = self.expert_table[rid]  # (B, S, K)
        logits = None if self.gate is None else self.gate(x).float()  # (B, S, E)
        weights = chosen_expert_weights(expert_ids, logits if self.weights_kind == "learned" else None)
        if self.learned_top > 0:  # the most frequent routing ids are routed by the learned gate
            gate_ids, gate_weights, _ = topk_gate(logits, self.top_k)
            learned = (rid < self.learned_top).unsqueeze(-1)
            expert_ids = torch.where(learned, gate_ids, expert_ids)
            weights = torch.where(learned, gate_weights, weights)
        expert_ids, weights = self.decide(expert_ids, weights, ctx)
        return RouterOutput(expert_ids=expert_ids, weights=weights)

    def decide(self, expert_ids: torch.Tensor, weights: torch.Tensor | None, ctx: RoutingContext
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token decisions as they are (held-decision routers override this; ``weights`` None: ids only)."""
        return expert_ids, weights

    @torch.no_grad()
    def routing_shares(self, token_ids: torch.Tensor) -> dict[str, float]:
        """Share of the tokens of whole sequences (B, S) routed by a vocabulary entry (``vocab``), by a hashed
        bucket (``bucket``) and by the learned gate (``learned``, the ``learned_top`` most frequent entries)."""
        token_ids = token_ids.to(self.expert_table.device)
        positions = torch.arange(token_ids.shape[1], device=token_ids.device).expand_as(token_ids)
        rid = self.routing_ids(RoutingContext(history_ids=token_ids, positions=positions))
        n = max(rid.numel(), 1)
        learned = int((rid < self.learned_top).sum())
        bucket = int((rid >= self.vocab_size).sum())
        return {"vocab": (rid.numel() - learned - bucket) / n, "bucket": bucket / n, "learned": learned / n}

    def describe(self) -> str:
        return (f"{self.label}(spans={self.span.describe()}, vocab={self.vocab_size}, "
                f"learned_top={self.learned_top}, weights={self.weights_kind}, k={self.top_k})")

    label = "span_vocab"


class FirstPieceVocabRouter(VocabRouter):
    """Routes a whole span by its first piece: a first-piece routing vocabulary, decided at the span's first
    token and held (a learned gate's weights or decisions too, carried across decoding chunks)."""

    unit = "first_piece"
    label = "span_first_piece"

    def __init__(
        self, spec: LayerSpec, *, spans: str = "word", span_len: int = 4, vocab_size: int = 16384,
        num_buckets: int = 4096, learned_top: int = 0, weights: str = "uniform", seed: int = 0,
        resources: Any = None,
    ) -> None:
        super().__init__(spec, spans=spans, span_len=span_len, vocab_size=vocab_size, num_buckets=num_buckets,
                         max_span_len=1, learned_top=learned_top, weights=weights, seed=seed, resources=resources)

    def keys(self, ctx: RoutingContext) -> torch.Tensor:
        # capped at one token, the prefix hash at every token is the hash of its span's first piece
        return prefix_hash(ctx.history_ids, self.spans.history_starts(ctx), 1)[:, -ctx.seq_len :]

    def decide(self, expert_ids: torch.Tensor, weights: torch.Tensor | None, ctx: RoutingContext
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        first, state = self.spans.first_in_chunk(ctx), ctx.state(self.layer_idx)
        held_weights = None if weights is None else hold(weights, first, state, "weights")
        return hold(expert_ids, first, state, "expert_ids"), held_weights


class PrefixVocabRouter(VocabRouter):
    """Routes every token by the prefix of its span seen so far (causal), over a vocabulary of span prefixes."""

    unit = "prefix"
    label = "span_prefix"

    def __init__(
        self, spec: LayerSpec, *, spans: str = "word", span_len: int = 4, vocab_size: int = 16384,
        num_buckets: int = 4096, max_span_len: int = 16, learned_top: int = 0, weights: str = "uniform",
        seed: int = 0, resources: Any = None,
    ) -> None:
        super().__init__(spec, spans=spans, span_len=span_len, vocab_size=vocab_size, num_buckets=num_buckets,
                         max_span_len=max_span_len, learned_top=learned_top, weights=weights, seed=seed,
                         resources=resources)

    def keys(self, ctx: RoutingContext) -> torch.Tensor:
        return prefix_hash(ctx.history_ids, self.spans.history_starts(ctx), self.max_span_len)[:, -ctx.seq_len :]


class WholeWordRouter(VocabRouter):
    """MoWE's key: every token of a span is routed by the complete span. LOOKS AHEAD (see the module docstring)."""

    causal = False
    unit = "whole_word"
    label = "span_whole_word"

    def __init__(
        self, spec: LayerSpec, *, spans: str = "word", span_len: int = 4, vocab_size: int = 16384,
        num_buckets: int = 4096, max_span_len: int = 16, learned_top: int = 0, weights: str = "uniform",
        seed: int = 0, allow_lookahead: bool = False, resources: Any = None,
    ) -> None:
        super().__init__(spec, spans=spans, span_len=span_len, vocab_size=vocab_size, num_buckets=num_buckets,
                         max_span_len=max_span_len, learned_top=learned_top, weights=weights, seed=seed,
                         resources=resources, allow_lookahead=allow_lookahead)

    def keys(self, ctx: RoutingContext) -> torch.Tensor:
        return full_span_hash(ctx.history_ids, self.spans.history_starts(ctx), self.max_span_len)[:, -ctx.seq_len :]
