"""moe-variants: compare Mixture-of-Experts routers inside the full Mixtral architecture.

Shape legend used across the package: B batch, S sequence, D model dim, H heads, E experts,
K experts per token, F expert hidden dim, V vocabulary, T = B*S tokens, N = T*K routed copies.
"""

from moe_variants.args import ModelArgs
from moe_variants.model import ModelOutput, Transformer
from moe_variants.routing import RouterOutput, RoutingContext

__all__ = ["ModelArgs", "ModelOutput", "RouterOutput", "RoutingContext", "Transformer"]
