"""``ModelArgs``: the single source of Mixtral architecture hyperparameters (paper Table 1 names)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class ModelArgs:
    """Mixtral architecture. Defaults are Mixtral 8x7B (arXiv 2401.04088, Table 1, and its released config)."""

    dim: int = 4096  # model width (HF hidden_size)
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8  # grouped-query attention: n_heads / n_kv_heads query heads share one K/V head
    head_dim: int | None = None  # None -> dim // n_heads (Mixtral: 128)
    hidden_dim: int = 14336  # SwiGLU hidden size of each expert (HF intermediate_size)
    vocab_size: int = 32000
    num_experts: int = 8
    num_experts_per_tok: int = 2  # top-K
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None  # Mixtral attends densely over its whole context (paper §2)
    max_seq_len: int = 32768  # positions the model is built for (HF max_position_embeddings)
    init_std: float = 0.02  # normal init of linear and embedding weights (HF initializer_range)
    num_shared_experts: int = 0  # DeepSeekMoE (arXiv 2401.06066): always-active experts beside the routed ones
    shared_hidden_dim: int | None = None  # SwiGLU width of each shared expert (None -> hidden_dim)
    capacity_factor: float | None = None  # Switch/GShard token dropping: each expert computes at most
    # ceil(capacity_factor * T * K / E) of a forward's T*K token copies; None = dropless (Mixtral)
    allow_lookahead: bool = False  # capacity dropping looks ahead (see __post_init__): build it only when allowed

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.n_heads <= 0 or self.dim % self.n_heads:
                raise ValueError(
                    f"dim={self.dim} is not divisible by n_heads={self.n_heads}: set head_dim explicitly "
                    f"or choose n_heads dividing dim"
                )
            self.head_dim = self.dim // self.n_heads
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                    "num_experts", "num_experts_per_tok", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads} "
                f"(grouped-query attention shares each K/V head among n_heads/n_kv_heads query heads)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must satisfy 1 <= top_k <= "
                f"num_experts={self.num_experts}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        if self.shared_hidden_dim is not None and (not isinstance(self.shared_hidden_dim, int)
                                                   or self.shared_hidden_dim <= 0):
            raise ValueError(f"shared_hidden_dim must be a positive integer or None, got {self.shared_hidden_dim!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"capacity_factor must be > 0 (or None for dropless experts), got {self.capacity_factor!r}"
            )
        if self.capacity_factor is not None and not self.allow_lookahead:
            # the capacity is a share of all B*S*K copies of the forward, so whether position t's copy is dropped
            # depends on how many tokens follow it (a prefix, or cached decoding, drops differently): look-ahead
            raise ValueError(
                f"capacity_factor={self.capacity_factor} looks ahead: each expert's capacity is a share of all the "
                f"forward's token copies, so a position's drop depends on the tokens after it (the audit catches "
                f"it). Set model.allow_lookahead=true to build it anyway; the run is then labelled non-causal."
            )
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("norm_eps and rope_theta must be positive")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """Build from a mapping, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"_target_"})
        if unknown:
            raise ValueError(f"unknown ModelArgs field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
