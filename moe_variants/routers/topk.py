"""Learned top-k gating. Mixtral (arXiv 2401.04088 §2.1): G(x) = Softmax(TopK(x W_g)); as options, the score
function of DeepSeek-V3 (arXiv 2412.19437 §2.1.2: sigmoid affinities, top-k weights renormalised) and plain
top-k probabilities without renormalising (Switch, GShard)."""

from __future__ import annotations

import torch
from torch import nn

from moe_variants.model.losses import load_balance_loss, z_loss
from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext
from moe_variants.routers.gates import SCORE_FUNCS, topk_gate


class TopKRouter(Router):
    """Learned top-k router: a bias-free linear gate (D -> E), routing math in fp32.

    Options: ``score_func`` softmax (Mixtral) or sigmoid (DeepSeek-V3); ``renormalize`` the top-k weights to sum
    to 1 (Mixtral, DeepSeek-V3) or keep the raw scores. Only softmax + renormalise + no jitter is Mixtral's gate
    (exportable to HF).

    Aux losses (unweighted): ``load_balance`` (Switch, per layer, balanced = 1.0 for any k; sigmoid scores are
    normalised per token first, as DeepSeek-V3's balance loss does) and ``z_loss``. ``jitter_eps`` multiplies the
    gate input by U(1 - eps, 1 + eps) noise in training (Switch/HF jitter).
    """

    hf_exportable = True

    def __init__(self, spec: LayerSpec, *, jitter_eps: float = 0.0, score_func: str = "softmax",
                 renormalize: bool = True) -> None:
        super().__init__(spec)
        if not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"unknown score_func {score_func!r}; choices: {list(SCORE_FUNCS)}")
        self.jitter_eps = jitter_eps
        self.score_func, self.renormalize = score_func, renormalize
        self.hf_exportable = score_func == "softmax" and renormalize  # else not Mixtral's gate
        self.gate = nn.Linear(spec.dim, spec.num_experts, bias=False)

    def selection_bias(self) -> torch.Tensor | None:
        """(E,) added to the scores when choosing experts (not to the weights); None for plain top-k."""
        return None

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        if self.training and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits = self.gate(x).float()  # (B, S, E)
        expert_ids, weights, scores = topk_gate(logits, self.top_k, self.score_func, self.renormalize,
                                                self.selection_bias())
        probs = scores if self.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        aux = {
            "load_balance": load_balance_loss(probs.flatten(0, 1), expert_ids.flatten(0, 1), self.balance_group()),
            "z_loss": z_loss(logits.flatten(0, 1)),
        }
        return RouterOutput(expert_ids=expert_ids, weights=weights, logits=logits, aux_losses=aux)

    def describe(self) -> str:
        if self.score_func == "softmax" and self.renormalize:
            return f"topk(k={self.top_k})"
        return f"topk(k={self.top_k}, {self.score_func}{'' if self.renormalize else ', raw weights'})"
