"""Multi-token span routing: one routing decision per span, reused for every token of the span.

Spans (``spans``): ``word`` (a span starts at a token that begins a word, so the pieces of a word form one
span) or ``fixed`` (every ``span_len`` tokens). Decision sources (``decision``):

- ``learned_head``: Mixtral's learned top-k gate evaluated at the span's first token, held for the span;
- ``routing_vocab`` (MoWE, arXiv 2311.10768, made causal): the routing id of the span *prefix* seen so far
  (a frequent word has its own id, the rest share hashed buckets) mapped to K experts by a fixed per-layer
  table; the ``learned_top`` most frequent routing ids fall back to the learned gate, as MoWE leaves its
  most frequent words unrouted. With ``hold=true`` (default) the decision taken at the span's first token
  (prefix = its first piece) is held for the whole span; ``hold=false`` re-decides at every token from the
  longer prefix (the pieces of one word may then go to different experts);
- ``whole_word`` (MoWE as published): the id of the complete word. This LOOKS AHEAD in a causal LM (the
  first piece's routing reveals the rest of the word); it refuses to build unless ``allow_lookahead=true``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_variants.model.losses import load_balance_loss, z_loss
from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext
from moe_variants.routers.hash import hashed_weights, random_expert_table
from moe_variants.routers.resources import ROUTING_VOCAB_VERSION, lookup_routing_ids
from moe_variants.routers.spans import SpanDef, start_index
from moe_variants.routers.topk import topk_gate

DECISIONS = ("learned_head", "routing_vocab", "whole_word")


class SpanRouter(Router):
    def __init__(
        self, spec: LayerSpec, *, spans: str = "word", span_len: int = 4, decision: str = "learned_head",
        vocab_size: int = 16384, num_buckets: int = 4096, max_span_len: int = 16, learned_top: int = 0,
        weights: str = "uniform", hold: bool = True, seed: int = 0, allow_lookahead: bool = False,
    ) -> None:
        super().__init__(spec)
        if decision not in DECISIONS:
            raise ValueError(f"unknown span decision {decision!r}; choices: {list(DECISIONS)}")
        self.span = SpanDef(spans, span_len)
        self.decision, self.max_span_len, self.learned_top = decision, max_span_len, learned_top
        self.causal = decision != "whole_word"
        self.refuse_lookahead(allow_lookahead)
        E, K = spec.num_experts, spec.top_k
        needs_gate = decision == "learned_head" or learned_top > 0 or weights == "learned"
        self.gate = nn.Linear(spec.dim, E, bias=False) if needs_gate else None
        self.weights_kind = weights
        self.hold = hold  # vocabulary decisions: one per span (taken at its first token) or one per token
        self.tokenizer_fingerprint = ""
        if decision != "learned_head":
            if spec.resources is None:  # rebuilt from a checkpoint: vocabulary and table come from its state dict
                hashes = torch.full((vocab_size,), -1, dtype=torch.int64)
                ranks = torch.arange(vocab_size)
            else:
                vocab = spec.resources.routing_vocab(vocab_size, num_buckets, max_span_len)
                hashes, ranks, self.tokenizer_fingerprint = vocab.hashes, vocab.ranks, vocab.tokenizer_fingerprint
            self.num_buckets = num_buckets
            self.register_buffer("vocab_hashes", hashes)  # (size,) sorted span hashes
            self.register_buffer("vocab_ranks", ranks)  # (size,) routing id of each
            table = random_expert_table(vocab_size + num_buckets, E, K, seed * 100_003 + spec.layer_idx)
            self.register_buffer("expert_table", table)  # (routing ids, K)

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
        if state.get("routing_vocab_version", ROUTING_VOCAB_VERSION) != ROUTING_VOCAB_VERSION:
            raise ValueError("the checkpoint's routing vocabulary has another format version: rebuild it")
        self.tokenizer_fingerprint = saved or self.tokenizer_fingerprint

    def routing_ids(self, ctx: RoutingContext) -> torch.Tensor:
        """(B, S) routing-vocabulary ids: of the span prefix (causal) or the whole span (look-ahead)."""
        if self.decision == "whole_word":
            h = ctx.span_full_hash(self.max_span_len, self.span)
        else:
            h = ctx.span_prefix_hash(self.max_span_len, self.span)
        return lookup_routing_ids(h, self.vocab_hashes, self.vocab_ranks, self.num_buckets)

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        if self.decision == "learned_head":
            logits = self._hold(ctx, "logits", self.gate(x).float())  # (B, S, E) the span's first token's
            expert_ids, weights, probs = topk_gate(logits, self.top_k)
            aux = {  # token-weighted: what the experts actually process
                "load_balance": load_balance_loss(probs.flatten(0, 1), expert_ids.flatten(0, 1)),
                "z_loss": z_loss(logits.flatten(0, 1)),
            }
            return RouterOutput(expert_ids=expert_ids, weights=weights, logits=logits, aux_losses=aux)
        rid = self.routing_ids(ctx)  # (B, S)
        expert_ids = self.expert_table[rid]  # (B, S, K)
        weights, logits = hashed_weights(self.gate if self.weights_kind == "learned" else None, x, expert_ids)
        if self.learned_top > 0:  # the most frequent routing ids use the learned gate
            logits = self.gate(x).float() if logits is None else logits
            gate_ids, gate_w, _ = topk_gate(logits, self.top_k)
            frequent = (rid < self.learned_top).unsqueeze(-1)
            expert_ids = torch.where(frequent, gate_ids, expert_ids)
            weights = torch.where(frequent, gate_w, weights)
        if self.hold:
            expert_ids = self._hold(ctx, "expert_ids", expert_ids)
            weights = self._hold(ctx, "weights", weights)
            logits = None if logits is None else self._hold(ctx, "logits", logits)
        return RouterOutput(expert_ids=expert_ids, weights=weights, logits=logits)

    def _hold(self, ctx: RoutingContext, key: str, values: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) values -> the values at each token's span start (causal: the start is <= t).

        In incremental decoding a span may have started in an earlier chunk: its value is carried in the
        layer's router state.
        """
        first = start_index(ctx.span_starts(self.span))  # (B, S); -1: span began before this chunk
        index = first.clamp(min=0).view(*first.shape, *([1] * (values.dim() - 2))).expand_as(values)
        held = torch.gather(values, 1, index)
        state = ctx.state(self.layer_idx)
        if state is not None:
            if key in state:
                before = (first < 0).view(*first.shape, *([1] * (values.dim() - 2)))
                held = torch.where(before, state[key].unsqueeze(1), held)
            state[key] = held[:, -1]
        return held

    def describe(self) -> str:
        span = "word" if self.span.kind == "word" else f"fixed{self.span.span_len}"
        return f"span(spans={span}, decision={self.decision}, k={self.top_k})"

