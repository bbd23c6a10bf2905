"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437 §2.1.2).

A per-expert bias ``b`` is added to the expert scores when choosing the top-k, never to the combine weights, and is
updated outside the gradient after each optimizer step by the sign of each expert's load error::

    b_i += rate * sign(mean_j load_j - load_i)

so an overloaded expert gets chosen less and an underloaded one more, with no auxiliary loss pulling against the LM
loss. DeepSeek-V3 pairs it with sigmoid scores whose top-k are renormalised (the defaults here).

Who does what: the router holds the bias (a buffer, so checkpoint state) and the update rule (:meth:`update_bias`).
The training loop counts one optimizer step's assignments over all its micro-batches and ranks and calls
``update_bias`` once per step (``training.callbacks.BiasBalancing``), so gradient accumulation does not change the
update. In a plain loop: sum ``experts.expert_counts(routing.expert_ids, E)`` over the step's micro-batches, then
``router.update_bias(counts)`` after ``optimizer.step()``. Loads are the router's choices (before any capacity drop).
"""

from __future__ import annotations

import torch

from moe_variants.model.routing import LayerSpec
from moe_variants.routers.topk import TopKRouter


def bias_delta(counts_E: torch.Tensor, rate: float) -> torch.Tensor:
    """(E,) the update ``rate * sign(mean load - load)`` for one step's assignment counts (E,)."""
    counts = counts_E.float()
    return rate * torch.sign(counts.mean() - counts)


class AuxFreeRouter(TopKRouter):
    """Learned top-k router whose expert choice is steered by a bias balanced outside the gradient.

    Args:
        bias_update_rate: the bias step per optimizer step (DeepSeek-V3's gamma: 0.001 for most of its training,
            at a learning rate of 2.2e-4); 0 freezes the bias. Default 0.01: on the small model at lr 3e-3, 0.001
            left the layers collapsed after 150 steps and 0.01 balanced best per step (results/router_zoo/README.md).
        score_func, renormalize, jitter_eps: as :class:`TopKRouter` (defaults: DeepSeek-V3's sigmoid, renormalised).
    """

    def __init__(self, spec: LayerSpec, *, bias_update_rate: float = 1e-2, score_func: str = "sigmoid",
                 renormalize: bool = True, jitter_eps: float = 0.0) -> None:
        super().__init__(spec, jitter_eps=jitter_eps, score_func=score_func, renormalize=renormalize)
        if not bias_update_rate >= 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate!r}")
        self.hf_exportable = False  # Mixtral's format has no selection bias
        self.bias_update_rate = bias_update_rate
        self.register_buffer("expert_bias", torch.zeros(spec.num_experts))  # (E,) checkpoint state, no gradient

    def selection_bias(self) -> torch.Tensor:
        return self.expert_bias

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        """Apply one optimizer step's update from that step's assignment counts per expert (E,), all micro-batches
        and ranks summed."""
        if counts_E.shape != self.expert_bias.shape:
            raise ValueError(f"update_bias needs ({self.num_experts},) counts, got {tuple(counts_E.shape)}")
        self.expert_bias.add_(bias_delta(counts_E.to(self.expert_bias.device), self.bias_update_rate))

    def describe(self) -> str:
        return f"aux_free(k={self.top_k}, {self.score_func}, rate={self.bias_update_rate:g})"
