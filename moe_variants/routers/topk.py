"""Learned top-k gating. Mixtral (arXiv 2401.04088 §2.1): G(x) = Softmax(TopK(x W_g)); as options, the score
function of DeepSeek-V3 (arXiv 2412.19437 §2.1.2: sigmoid affinities, top-k weights renormalised) and plain
top-k probabilities without renormalising (Switch, GShard)."""

from __future__ import annotations

import torch
from torch import nn

from moe_variants.model.losses import load_balance_loss, z_loss
from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext

SCORE_FUNCS = ("softmax", "sigmoid")


def topk_gate(
    logits: torch.Tensor, k: int, score_func: str = "softmax", renormalize: bool = True,
    selection_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 scores over all experts (softmax or sigmoid), top-k, optionally renormalised to sum to 1. Softmax
    renormalised (the default, Mixtral) is the softmax over the top-k logits.

    ``selection_bias`` (E,) is added to the scores for choosing the experts only; the weights are the unbiased
    scores (DeepSeek-V3's auxiliary-loss-free balancing).

    Returns (expert_ids (..., K), weights (..., K), scores (..., E)).
    """
    if score_func == "softmax":
        scores = torch.softmax(logits.float(), dim=-1)
    elif score_func == "sigmoid":
        scores = torch.sigmoid(logits.float())
    else:
        raise ValueError(f"unknown score_func {score_func!r}; choices: {list(SCORE_FUNCS)}")
    choice = scores if selection_bias is None else scores + selection_bias
    expert_ids = choice.topk(k, dim=-1).indices
    top = scores.gather(-1, expert_ids)
    return expert_ids, top / top.sum(-1, keepdim=True) if renormalize else top, scores


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
            "load_balance": load_balance_loss(probs.flatten(0, 1), expert_ids.flatten(0, 1)),
            "z_loss": z_loss(logits.flatten(0, 1)),
        }
        return RouterOutput(expert_ids=expert_ids, weights=weights, logits=logits, aux_losses=aux)

    def describe(self) -> str:
        if self.score_func == "softmax" and self.renormalize:
            return f"topk(k={self.top_k})"
        return f"topk(k={self.top_k}, {self.score_func}{'' if self.renormalize else ', raw weights'})"
