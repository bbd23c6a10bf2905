"""Learned top-k softmax gating (Mixtral, arXiv 2401.04088 §2.1): G(x) = Softmax(TopK(x W_g))."""

from __future__ import annotations

import torch
from torch import nn

from moe_variants.model.losses import load_balance_loss, z_loss
from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext
from moe_variants.routers.gates import topk_gate


class TopKRouter(Router):
    """Mixtral's router: a bias-free linear gate (D -> E), routing math in fp32.

    Aux losses (unweighted): ``load_balance`` (Switch, per layer, balanced = 1.0 for any k) and ``z_loss``.
    ``jitter_eps`` multiplies the gate input by U(1 - eps, 1 + eps) noise in training (Switch/HF jitter).
    """

    hf_exportable = True

    def __init__(self, spec: LayerSpec, *, jitter_eps: float = 0.0) -> None:
        super().__init__(spec)
        if not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        self.jitter_eps = jitter_eps
        self.gate = nn.Linear(spec.dim, spec.num_experts, bias=False)

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        if self.training and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits = self.gate(x).float()  # (B, S, E)
        expert_ids, weights, probs = topk_gate(logits, self.top_k)
        aux = {
            "load_balance": load_balance_loss(probs.flatten(0, 1), expert_ids.flatten(0, 1)),
            "z_loss": z_loss(logits.flatten(0, 1)),
        }
        return RouterOutput(expert_ids=expert_ids, weights=weights, logits=logits, aux_losses=aux)

    def describe(self) -> str:
        return f"topk(k={self.top_k})"
