"""Test-only router whose decisions say which training step made them: the n-th training forward sends every token
to experts n % E, (n + 1) % E, ... (K of them). Never used outside tests."""

from __future__ import annotations

import torch

from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext


class StepRouter(Router):
    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec)
        self.training_forwards = 0  # a plain attribute: not saved in checkpoints

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        n = self.training_forwards
        if self.training:
            self.training_forwards += 1
        B, S = ctx.token_ids.shape
        expert_ids = ((n + torch.arange(self.top_k)) % self.num_experts).expand(B, S, self.top_k).clone()
        return RouterOutput(expert_ids=expert_ids, weights=torch.full((B, S, self.top_k), 1.0 / self.top_k))
