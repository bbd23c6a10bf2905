"""moe-variants: compare Mixture-of-Experts routers inside the full Mixtral architecture.

Shape legend used across the package: B batch, S sequence, D model dim, H heads, E experts,
K experts per token, F expert hidden dim, V vocabulary, T = B*S tokens, N = T*K routed copies.
"""

from moe_variants.model.args import ModelArgs
from moe_variants.model.routing import RouterOutput, RoutingContext
from moe_variants.model.transformer import ModelOutput, Transformer

__all__ = ["ModelArgs", "ModelOutput", "RouterOutput", "RoutingContext", "Transformer"]
