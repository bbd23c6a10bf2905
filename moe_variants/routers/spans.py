"""Multi-token spans computed from token ids alone: word starts, span prefixes and their hashes.

Used by both sides: the data module supplies ``span_start`` per token, span routers and the analysis read
the same definitions. Everything except :func:`full_span_hash` is causal (position t reads tokens <= t).

A *word span* starts at a token that begins a word: a SentencePiece piece with the ``▁`` marker (or a
byte-level BPE piece with ``Ġ``), a special or byte-fallback token, or a piece whose first character is not
a letter or digit (punctuation, symbols, newlines start their own span). So ``▁un|believ|able`` is one span
and ``▁hello|,`` two. A *fixed span* starts every n positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

WORD_MARKERS = ("\u2581", "\u0120")  # SentencePiece "▁", byte-level BPE "Ġ"
_HASH_MOD = (1 << 31) - 1  # Mersenne prime: products with the base stay inside int64
_HASH_BASE = 1_000_003


@dataclass(frozen=True)
class SpanDef:
    """Which spans a router uses: ``word`` (tokenizer word starts) or ``fixed`` (every ``span_len`` tokens)."""

    kind: str = "word"
    span_len: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("word", "fixed"):
            raise ValueError(f"unknown span kind {self.kind!r}; choices: ['fixed', 'word']")
        if self.span_len < 1:
            raise ValueError(f"span_len must be >= 1, got {self.span_len}")


def piece_starts_word(piece: str, special: bool = False) -> bool:
    """Whether a vocabulary piece begins a new word span (see module docstring)."""
    if special or not piece:
        return True
    if piece.startswith(WORD_MARKERS):
        return True
    if piece.startswith("<") and piece.endswith(">"):  # <s>, </s>, <unk>, <0x0A> byte-fallback tokens
        return True
    return not piece[0].isalnum()


def word_start_table(pieces: Sequence[str], special_ids: Sequence[int] = ()) -> torch.Tensor:
    """(V,) bool table: True for token ids whose piece begins a word span.

    Args:
        pieces: the vocabulary, ``pieces[i]`` is the string of token id i.
        special_ids: ids of special/control tokens (always span starts).
    """
    special = set(special_ids)
    return torch.tensor([piece_starts_word(p, i in special) for i, p in enumerate(pieces)], dtype=torch.bool)


def word_starts(token_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, S) bool word-start flags; position 0 of every row always starts a span."""
    if not torch.compiler.is_compiling() and token_ids.numel() and int(token_ids.max()) >= table.numel():
        raise ValueError(
            f"token id {int(token_ids.max())} is outside the word-start table of {table.numel()} entries: "
            f"the tokenizer does not match the model's vocabulary"
        )
    flags = table.to(token_ids.device)[token_ids]
    flags[:, 0] = True
    return flags


def fixed_starts(positions: torch.Tensor, span_len: int) -> torch.Tensor:
    """(B, S) bool: a span starts at every position divisible by ``span_len``."""
    if span_len < 1:
        raise ValueError(f"span_len must be >= 1, got {span_len}")
    return positions % span_len == 0


def start_index(starts: torch.Tensor) -> torch.Tensor:
    """(B, S) int64 index of the first token of the span containing each position (causal).

    Positions before the first start in a row (possible in a decoding chunk) get -1.
    """
    S = starts.shape[1]
    idx = torch.arange(S, device=starts.device).expand_as(starts)
    marked = torch.where(starts, idx, torch.full_like(idx, -1))
    return marked.cummax(dim=1).values


def prefix_hash(token_ids: torch.Tensor, starts: torch.Tensor, max_len: int = 16) -> torch.Tensor:
    """(B, S) int64 polynomial hash of the span prefix ending at each position (causal).

    The prefix is the tokens from the span start up to and including t, truncated to its last ``max_len``
    tokens. Equal prefixes get equal hashes wherever they occur.
    """
    B, S = token_ids.shape
    first = start_index(starts).clamp(min=0)  # (B, S)
    pos = torch.arange(S, device=token_ids.device).expand(B, S)
    h = torch.zeros(B, S, dtype=torch.int64, device=token_ids.device)
    power = 1
    for k in range(min(max_len, S)):  # token t-k contributes (id+1) * base^k
        src = pos - k
        valid = src >= first
        tok = torch.gather(token_ids, 1, src.clamp(min=0))
        h = (h + torch.where(valid, (tok + 1) * power, torch.zeros_like(tok))) % _HASH_MOD
        power = power * _HASH_BASE % _HASH_MOD
    return h



def full_span_hash(token_ids: torch.Tensor, starts: torch.Tensor, max_len: int = 16) -> torch.Tensor:
    """(B, S) int64 hash of the whole span containing each position. LOOKS AHEAD (reads up to the span end)."""
    B, S = token_ids.shape
    h = prefix_hash(token_ids, starts, max_len)
    # the last position of each span carries the hash of the complete span; broadcast it backwards
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    idx = torch.arange(S, device=token_ids.device).expand(B, S)
    end_idx = torch.where(ends, idx, torch.full_like(idx, S)).flip(1).cummin(dim=1).values.flip(1)
    return torch.gather(h, 1, end_idx)
