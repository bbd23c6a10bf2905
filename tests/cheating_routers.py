"""Test-only routers that cheat: each routes position t by token t+1 under one condition, and by token t otherwise.

Every one of them passed the first look-ahead audit (one seed, evaluation mode only, 2 x 48 uniform ids from a
512-id vocabulary) except ``CheatAlways`` and ``CheatAtWordEnds``; ``tests/test_audit.py`` checks that the audit
fails each of them. Never used outside tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext

MIXTRAL_NEWLINE_PERIOD_COMMA = (13, 28723, 28725)  # '<0x0A>', '.', ',' in Mixtral's tokenizer: 12% of real positions
THREE_IDS = (97, 211, 389)  # inside 0..511, the old audit's whole vocabulary


class NextTokenCheat(Router):
    """A random (V, K) token-id table; position t reads row ``token t+1`` where :meth:`peek` is True."""

    def __init__(self, spec: LayerSpec, seed: int = 0) -> None:
        super().__init__(spec)
        g = torch.Generator().manual_seed(seed * 100_003 + spec.layer_idx)
        table = torch.rand(spec.vocab_size, spec.num_experts, generator=g).argsort(-1)[:, : spec.top_k]
        self.register_buffer("table", table.contiguous())

    def peek(self, nxt: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, S-1) bool: whether position t (``positions``) routes by its next token ``nxt``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        ids = ctx.token_ids  # (B, S) the current chunk; in decoding, the next token does not exist yet
        key = ids.clone()
        if ids.shape[1] > 1:
            nxt = ids[:, 1:]
            key[:, :-1] = torch.where(self.peek(nxt, ctx.positions[:, :-1]), nxt, ids[:, :-1])
        expert_ids = self.table[key]  # (B, S, K)
        return RouterOutput(expert_ids=expert_ids, weights=torch.full(expert_ids.shape, 1.0 / self.top_k))


class CheatAlways(NextTokenCheat):
    def peek(self, nxt, positions):
        return torch.ones_like(nxt, dtype=torch.bool)


class CheatAtWordEnds(NextTokenCheat):
    """Peeks where token t ends a word, i.e. token t+1 starts one."""

    def __init__(self, spec: LayerSpec, word_start_table: torch.Tensor) -> None:
        super().__init__(spec)
        self.register_buffer("word_start", word_start_table.bool().clone())

    def peek(self, nxt, positions):
        return self.word_start[nxt]


class CheatInTraining(NextTokenCheat):
    def peek(self, nxt, positions):
        return torch.full_like(nxt, self.training, dtype=torch.bool)


class CheatOnRareIds(NextTokenCheat):
    """Peeks where token t+1 occurs fewer than ``below`` times in the corpus counts."""

    def __init__(self, spec: LayerSpec, counts: torch.Tensor, below: int = 5) -> None:
        super().__init__(spec)
        self.register_buffer("rare", counts < below)

    def peek(self, nxt, positions):
        return self.rare[nxt]


class CheatOnIds(NextTokenCheat):
    """Peeks where token t+1 is one of ``ids``."""

    def __init__(self, spec: LayerSpec, ids: Sequence[int]) -> None:
        super().__init__(spec)
        self.register_buffer("ids", torch.tensor(list(ids)))

    def peek(self, nxt, positions):
        return torch.isin(nxt, self.ids)


class CheatOnNewlinePeriodComma(CheatOnIds):
    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec, MIXTRAL_NEWLINE_PERIOD_COMMA)


class CheatOnThreeIds(CheatOnIds):
    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec, THREE_IDS)


class CheatFromPosition64(NextTokenCheat):
    def peek(self, nxt, positions):
        return positions >= 64
