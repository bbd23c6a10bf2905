"""Routing analysis: pure functions over routing decisions (tensors in, numbers/tensors/dicts/HTML out).

Used live (from a training callback) and offline (``experiments/<study>/analyze.py``) on the same
``ModelOutput.routing``; no Lightning, Hydra or W&B here. Conventions (shapes, masks, document boundaries,
normalisations) are in :mod:`moe_variants.analysis.metrics`. Figures: :mod:`moe_variants.analysis.plots`
(matplotlib imported lazily).
"""

from moe_variants.analysis.metrics import (
    best_token_expert_table,
    consecutive_repeat_rates,
    domain_specialization,
    expert_coactivation,
    expert_load,
    expert_load_per_domain,
    load_balance_stats,
    per_layer,
    random_repeat_baselines,
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
    "domain_specialization",
    "expert_coactivation",
    "expert_load",
    "expert_load_per_domain",
    "load_balance_stats",
    "per_layer",
    "plot_load_heatmap",
    "plot_load_per_domain",
    "plot_repeat_rates",
    "random_repeat_baselines",
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
