"""Balanced assignment (BASE layers, Lewis et al., arXiv 2103.16716), approximated by Sinkhorn iterations.

BASE assigns every token of the batch to experts so that each expert gets the same number of tokens while the sum
of token-expert scores is as high as possible (a linear assignment problem). Here the assignment is relaxed into
an entropic optimal transport between tokens (one unit each) and experts (T/E units each), solved by a fixed
number of Sinkhorn iterations on the router logits, as Megatron-LM's ``sinkhorn`` router and S-BASE do: each token
takes the K experts with the largest transport plan entries. The balancing only chooses (no gradient flows
through it); the combine weights are the softmax over the chosen experts' logits, or for K = 1 the sigmoid of
the chosen logit (BASE's gate: a softmax over one expert would be constant and train nothing).

It LOOKS AHEAD: the column (expert) normalisation sums over every token of the batch, later ones included, so a
token's experts depend on its future. It refuses to build unless ``allow_lookahead=true``, and it balances in
evaluation too (so that the audit sees what training sees).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext


@torch.no_grad()
def sinkhorn_plan(logits_TE: torch.Tensor, iterations: int) -> torch.Tensor:
    """(T, E) log transport plan whose rows (tokens) sum to 1 and columns (experts) to about T/E: alternately
    normalise the columns and the rows of ``exp(logits)`` (log domain, fp32). A row normalisation does not change
    a token's ranking of the experts, so the choice is the top-K of the logits plus one learned-free offset per
    expert, set so that the experts share the batch evenly."""
    T, E = logits_TE.shape
    log_p = logits_TE.float()
    for _ in range(iterations):
        log_p = log_p - log_p.logsumexp(dim=0, keepdim=True) + math.log(T / E)  # every expert carries T/E
        log_p = log_p - log_p.logsumexp(dim=1, keepdim=True)  # every token carries 1
    return log_p


class BalancedAssignmentRouter(Router):
    """Args:
    iterations: Sinkhorn iterations (more: closer to an exactly balanced assignment).
    allow_lookahead: must be True to build (the assignment reads the whole batch).
    """

    causal = False

    def __init__(self, spec: LayerSpec, *, iterations: int = 8, allow_lookahead: bool = False) -> None:
        super().__init__(spec)
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        self.iterations = iterations
        self.gate = nn.Linear(spec.dim, spec.num_experts, bias=False)
        self.refuse_lookahead(allow_lookahead)

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        B, S, _ = x.shape
        E, K = self.num_experts, self.top_k
        logits = self.gate(x).float()  # (B, S, E)
        plan_TE = sinkhorn_plan(logits.reshape(B * S, E), self.iterations)
        expert_ids = plan_TE.topk(K, dim=-1).indices.view(B, S, K)
        chosen = logits.gather(-1, expert_ids)
        weights = torch.sigmoid(chosen) if K == 1 else torch.softmax(chosen, dim=-1)
        return RouterOutput(expert_ids=expert_ids, weights=weights, logits=logits)

    def describe(self) -> str:
        return f"balanced(k={self.top_k}, sinkhorn x{self.iterations})"
