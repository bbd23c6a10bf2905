"""Auxiliary routing losses (unweighted) and the one place where their coefficients are applied."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moe_variants.model.experts import expert_counts
from moe_variants.model.routing import RouterOutput


def load_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balance loss of one layer, normalised so a perfectly balanced router gives 1.0.

    ``E * sum_e f_e * P_e`` with ``f_e`` the share of the T*K assignments that go to expert e (so sum f = 1
    for any K; HF's version counts each token K times and pools all layers, which we do not) and ``P_e`` the
    mean router probability of expert e over tokens.
    """
    T, E = probs_TE.shape
    f_E = expert_counts(expert_ids_TK, E).to(probs_TE.dtype) / expert_ids_TK.numel()
    P_E = probs_TE.mean(0)
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition of the router logits."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def aux_loss_terms(routing: Sequence[RouterOutput]) -> dict[str, torch.Tensor]:
    """Each auxiliary loss averaged over the layers that report it."""
    sums: dict[str, list[torch.Tensor]] = {}
    for layer in routing:
        for name, value in layer.aux_losses.items():
            sums.setdefault(name, []).append(value)
    return {name: torch.stack(values).mean() for name, values in sums.items()}


def compose_loss(
    lm_loss: torch.Tensor, routing: Sequence[RouterOutput], coefficients: Mapping[str, float]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss = LM loss + sum of coefficient * (layer-mean) aux loss. Returns (total, parts for logging).

    Every aux loss a router reports must have a coefficient (0.0 to log it without training on it), so a
    misspelled coefficient name cannot silently drop a loss.
    """
    terms = aux_loss_terms(routing)
    missing = sorted(set(terms) - set(coefficients))
    if missing:
        raise ValueError(
            f"routers report aux losses {missing} with no coefficient; set loss.{missing[0]}=<float> "
            f"(known coefficients: {sorted(coefficients)})"
        )
    total = lm_loss
    for name, value in terms.items():
        if coefficients[name]:
            total = total + coefficients[name] * value
    parts = {"lm_loss": lm_loss.detach(), **{name: v.detach() for name, v in terms.items()}}
    return total, parts
