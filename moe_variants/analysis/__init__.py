"""Routing analysis: the Mixtral paper's routing statistics (and OLMoE's) for any checkpoint, ours or HF Mixtral.

Owns: pure metric functions over routing decisions (``metrics``: tensors in, numbers/tensors/dicts out; used
live by a training callback and offline), figures (``plots``, matplotlib imported lazily), the token view
(``token_view``) and the ``moe-analyze`` app (``analyze``). Conventions (shapes, masks, document boundaries,
normalisations) are in :mod:`moe_variants.analysis.metrics`.

May import: torch, numpy, matplotlib; ``analyze`` alone also imports ``model``, ``data``,
``training.checkpoint`` (to load checkpoints), ``routers`` (the word-span definition, Mixtral's gate for HF
checkpoints), Hydra and W&B. ``metrics`` imports nothing of the project.
"""

from moe_variants.analysis.metrics import (
    best_token_expert_table,
    consecutive_repeat_rates,
    document_halves,
    document_ids,
    domain_specialization,
    expert_coactivation,
    expert_load,
    expert_load_per_domain,
    heldout_token_id_predictability,
    load_balance_stats,
    middle_layer,
    paper_layers,
    per_layer,
    random_repeat_baselines,
    random_routing,
    random_routing_baseline,
    repeat_rates_per_domain,
    router_entropy,
    router_saturation,
    span_coherence,
    token_id_predictability,
    vocabulary_specialization,
    vocabulary_specialization_per_token,
)
from moe_variants.analysis.plots import plot_load_heatmap, plot_load_per_domain, plot_repeat_rates
from moe_variants.analysis.token_view import token_html, token_html_page

__all__ = [
    "best_token_expert_table",
    "consecutive_repeat_rates",
    "document_halves",
    "document_ids",
    "domain_specialization",
    "expert_coactivation",
    "expert_load",
    "expert_load_per_domain",
    "heldout_token_id_predictability",
    "load_balance_stats",
    "middle_layer",
    "paper_layers",
    "per_layer",
    "plot_load_heatmap",
    "plot_load_per_domain",
    "plot_repeat_rates",
    "random_repeat_baselines",
    "random_routing",
    "random_routing_baseline",
    "repeat_rates_per_domain",
    "router_entropy",
    "router_saturation",
    "span_coherence",
    "token_html",
    "token_html_page",
    "token_id_predictability",
    "vocabulary_specialization",
    "vocabulary_specialization_per_token",
]
