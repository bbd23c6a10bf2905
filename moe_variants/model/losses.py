"""Auxiliary routing losses (unweighted) and the one place where their coefficients are applied."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from moe_variants.model.experts import expert_counts
from moe_variants.model.routing import RouterOutput


def load_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Switch-Transformer load-balance loss of one layer, normalised so a perfectly balanced router gives 1.0.

    ``E * sum_e f_e * P_e`` with ``f_e`` the share of the T*K assignments that go to expert e (so sum f = 1
    for any K; HF's version counts each token K times and pools all layers, which we do not) and ``P_e`` the
    mean router probability of expert e over tokens.

    ``group`` (a data-parallel process group, or None): ``f`` and ``P`` over the tokens of every rank of the group
    (:func:`global_balance_stats`), so that the loss is the one of one process on the global batch.
    """
    T, E = probs_TE.shape
    counts_E = expert_counts(expert_ids_TK, E).to(probs_TE.dtype)
    if group is not None:
        f_E, P_E = global_balance_stats(probs_TE, counts_E, expert_ids_TK.numel(), group)
    else:
        f_E, P_E = counts_E / expert_ids_TK.numel(), probs_TE.mean(0)
    return E * (f_E * P_E).sum()


def global_balance_stats(probs_TE: torch.Tensor, counts_E: torch.Tensor, copies: int, group: Any
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, P) of :func:`load_balance_loss` over the tokens of every rank of ``group``, in one all-reduce.

    ``f`` needs no gradient. The value of ``P`` is the global mean; its gradient reaches this rank's tokens only,
    scaled by ``W / T_all`` (W ranks, T_all tokens in all): data parallelism averages the W ranks' gradients, so
    each token's weight becomes ``1 / T_all``, what it has in one process on the global batch (also when the
    ranks hold different numbers of tokens).
    """
    E = counts_E.shape[0]
    sums_P = probs_TE.sum(0)  # (E,)
    # float64: counts stay exact past 2^24 copies
    stats = torch.cat([counts_E, sums_P.detach(), counts_E.new_tensor([copies, probs_TE.shape[0]])]).double()
    dist.all_reduce(stats, group=group)
    stats = stats.to(probs_TE.dtype)
    counts_all, sums_all, (copies_all, tokens_all) = stats[:E], stats[E:2 * E], stats[2 * E:]
    local = sums_P * (dist.get_world_size(group) / tokens_all)  # carries the gradient
    return counts_all / copies_all, local + (sums_all / tokens_all - local).detach()


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
