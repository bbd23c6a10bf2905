"""Span routing with a learned head: one decision per multi-token span, taken by Mixtral's learned top-k gate at
the span's first token and held for every token of the span.

Spans (``spans``, :mod:`moe_variants.routers.spans`): ``word`` (the pieces of one word form a span; a causal
function of the previous and the current token) or ``fixed`` (every ``span_len`` tokens). With fixed spans of
length 1 this is exactly :class:`~moe_variants.routers.topk.TopKRouter`.

The decision at a span's first token reads that token's hidden state only, so the router is causal. In incremental
decoding a span may have begun in an earlier chunk: its held logits are carried in the layer's router state.

Departure from the papers: MoWE (arXiv 2311.10768) routes words by a fixed routing vocabulary and does not hold a
learned gate's decision over a span; this router is the project's own learned-gate counterpart of span routing
(the vocabulary routers are in ``routers.span_vocab``).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_variants.model.losses import load_balance_loss, z_loss
from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext
from moe_variants.routers.gates import topk_gate
from moe_variants.routers.resources import word_span_kinds
from moe_variants.routers.spans import SpanDef, Spans, hold


class SpanHeadRouter(Router):
    """The learned top-k gate at each span's first token, held for the span.

    Aux losses (unweighted, token-weighted: what the experts actually process): ``load_balance`` and ``z_loss``
    of the held logits, as :class:`~moe_variants.routers.topk.TopKRouter`.
    """

    needs_resources = True  # word spans read the tokenizer's piece kinds

    def __init__(self, spec: LayerSpec, *, spans: str = "word", span_len: int = 4, resources: object = None) -> None:
        super().__init__(spec)
        span = SpanDef(spans, span_len)
        self.spans = Spans(span, word_span_kinds(span, resources, spec.vocab_size))
        self.gate = nn.Linear(spec.dim, spec.num_experts, bias=False)

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        first = self.spans.first_in_chunk(ctx)  # (B, S)
        logits = hold(self.gate(x).float(), first, ctx.state(self.layer_idx), "logits")  # (B, S, E) at span starts
        expert_ids, weights, probs = topk_gate(logits, self.top_k)
        aux = {
            "load_balance": load_balance_loss(probs.flatten(0, 1), expert_ids.flatten(0, 1), self.balance_group()),
            "z_loss": z_loss(logits.flatten(0, 1)),
        }
        return RouterOutput(expert_ids=expert_ids, weights=weights, logits=logits, aux_losses=aux)

    def describe(self) -> str:
        return f"span_head(spans={self.spans.span.describe()}, k={self.top_k})"
