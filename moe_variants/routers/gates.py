"""Gate maths shared by the routers, written once: a top-k gate (softmax or sigmoid scores), and combine weights
for experts that something other than the gate has chosen (a table, a hash, a routing vocabulary).

All routing maths runs in fp32, whatever the autocast dtype of the gate's input.
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHTS = ("uniform", "learned")
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


def check_weights(weights: str, top_k: int) -> None:
    """Refuse unknown combine weights, and ``learned`` at K=1: a softmax over one chosen expert's logit is always 1,
    so the gate would receive no gradient and never learn (Hash Layers routes K=1 with weight 1: ``uniform``)."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown combine weights {weights!r}; choices: {list(WEIGHTS)}")
    if weights == "learned" and top_k == 1:
        raise ValueError(
            "weights=learned with K=1 cannot learn (the softmax over one chosen expert is always 1): use "
            "router.weights=uniform, or model.num_experts_per_tok >= 2"
        )


def weight_gate(weights: str, dim: int, num_experts: int) -> nn.Linear | None:
    """The bias-free gate (D -> E) that scores chosen experts when ``weights == "learned"``, else None."""
    return nn.Linear(dim, num_experts, bias=False) if weights == "learned" else None


def chosen_expert_weights(expert_ids: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S, K) fp32 combine weights for fixed expert choices ``expert_ids`` (B, S, K): 1/K each without gate
    ``logits`` (B, S, E), else the softmax of the logits over the K chosen experts (the gate weights the experts;
    it does not choose them).
    """
    if logits is None:
        return torch.full(expert_ids.shape, 1.0 / expert_ids.shape[-1], device=expert_ids.device)
    return torch.softmax(logits.float().gather(-1, expert_ids), dim=-1)
