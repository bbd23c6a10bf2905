"""The Mixtral network and its routing seam.

Owns: ``ModelArgs`` (the architecture's hyperparameters), the ``Transformer`` (RMSNorm, RoPE, grouped-query
attention, optional sliding window, MoE feed-forward with SwiGLU experts, chunked cross-entropy, ``generate``),
the expert containers and the local dispatcher (``experts``), the router contract (``routing``: ``Router``,
``RouterOutput``, ``RoutingContext``), the shared routing losses (``losses``) and HF weight conversion (``hf``).

May import: torch, safetensors, ``moe_variants.paths``. Never a router implementation, Hydra, Lightning or data:
routers are injected by whoever builds the model.
"""

from moe_variants.model.args import ModelArgs
from moe_variants.model.routing import Router, RouterOutput, RoutingContext
from moe_variants.model.transformer import ModelOutput, Transformer

__all__ = ["ModelArgs", "ModelOutput", "Router", "RouterOutput", "RoutingContext", "Transformer"]
