"""Multi-token spans from token ids alone: what a word is, span starts, span-prefix hashes, held decisions.

Span routers and the span analysis read these definitions; the router contract knows nothing of spans. Everything
except :func:`full_span_hash` is causal: the value at position t reads tokens <= t only.

**Word spans.** Every vocabulary piece gets a *kind* from its string (:func:`piece_kinds`, over pieces in
SentencePiece notation as ``moe_variants.data.tokenizer.vocab_pieces`` gives them): a word piece with the space
marker (``▁The``), a letter or digit piece without it (``believ``, ``self``), punctuation or a symbol (``(``, ``):``,
``▁=``, ``'``), whitespace (``<0x0A>``, ``<0x09>``, ``▁▁▁``), a special token, the first byte of a byte-fallback
character (``<0xF0>``) or a continuation byte (``<0x9F>``). A token starts a word span (:func:`word_starts`, a
function of the previous and the current token) when

- it is a marked word piece, punctuation, whitespace, a special token or a byte-fallback first byte; or
- it is an unmarked letter/digit piece that follows whitespace, punctuation, a special token or a byte-fallback
  character (so a line-initial ``The`` after ``<0x0A>`` and the ``self`` of ``(self`` start words);

and never when it is a continuation byte (the bytes of one character stay together). So ``▁un|believ|able`` is one
span, and ``(``, ``self``, ``):``, ``<0x0A>``, ``The`` are five. Position 0 always starts a span.

A *fixed span* starts at every position divisible by ``span_len``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_variants.model.routing import RoutingContext

SPACE_MARKER = "\u2581"  # SentencePiece's "▁"
# piece kinds (int8 codes of the table that piece_kinds builds)
WORD, CONT, PUNCT, SPACE, SPECIAL, BYTE_LEAD, BYTE_CONT = range(7)
KIND_NAMES = ("word", "cont", "punct", "space", "special", "byte_lead", "byte_cont")
_OPENS = (WORD, PUNCT, SPACE, SPECIAL, BYTE_LEAD)  # always start a span
_CLOSES = (PUNCT, SPACE, SPECIAL, BYTE_LEAD, BYTE_CONT)  # an unmarked letter/digit piece after them starts one
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
HASH_MOD = (1 << 31) - 1  # Mersenne prime: a cumulative sum of < 2^31 terms stays exact in int64 up to 2^32 tokens
HASH_BASE = 1_000_003


@dataclass(frozen=True)
class SpanDef:
    """Which spans a router uses: ``word`` (see the module docstring) or ``fixed`` (every ``span_len`` tokens)."""

    kind: str = "word"
    span_len: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("word", "fixed"):
            raise ValueError(f"unknown span kind {self.kind!r}; choices: ['fixed', 'word']")
        if self.span_len < 1:
            raise ValueError(f"span_len must be >= 1, got {self.span_len}")

    def describe(self) -> str:
        return "word" if self.kind == "word" else f"fixed{self.span_len}"


def piece_kind(piece: str, special: bool = False) -> int:
    """The kind of one vocabulary piece in SentencePiece notation (see the module docstring)."""
    if special or not piece:
        return SPECIAL
    if m := _BYTE.match(piece):  # byte fallback: <0xNN>
        byte = int(m[1], 16)
        if byte >= 0xC0:
            return BYTE_LEAD
        if byte >= 0x80:
            return BYTE_CONT
        char = chr(byte)
        return SPACE if char.isspace() else CONT if char.isalnum() else PUNCT
    body = piece.lstrip(SPACE_MARKER)
    if not body or body[0].isspace():
        return SPACE
    if body[0].isalnum():
        return WORD if len(body) < len(piece) else CONT
    return PUNCT


def piece_kinds(pieces: Sequence[str], special_ids: Sequence[int] = ()) -> torch.Tensor:
    """(V,) int8 kind of every piece; ``pieces[i]`` is token id i in SentencePiece notation."""
    special = set(special_ids)
    return torch.tensor([piece_kind(p, i in special) for i, p in enumerate(pieces)], dtype=torch.int8)


def word_starts(token_ids: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """(B, S) bool word-start flags of whole sequences (position 0 of every row starts a span).

    Causal: the flag at t is a function of the tokens t-1 and t.
    """
    if not torch.compiler.is_compiling() and token_ids.numel() and int(token_ids.max()) >= kinds.numel():
        raise ValueError(
            f"token id {int(token_ids.max())} is outside the word-span table of {kinds.numel()} pieces: "
            f"the tokenizer does not match the model's vocabulary"
        )
    kinds = kinds.to(token_ids.device)
    opens = torch.zeros(len(KIND_NAMES), dtype=torch.bool, device=token_ids.device)
    closes = opens.clone()
    opens[list(_OPENS)], closes[list(_CLOSES)] = True, True
    k = kinds[token_ids].long()  # (B, S)
    starts = opens[k]
    starts[:, 1:] |= (k[:, 1:] == CONT) & closes[k[:, :-1]]
    starts[:, 0] = True
    return starts


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
    """(B, S) int64 hash of the span prefix ending at each position (causal), in [0, 2^31 - 1).

    The prefix is the span's tokens from its start up to t, capped at its first ``max_len`` tokens; its hash is
    ``sum_i (id_i + 1) * 1000003^i mod (2^31 - 1)`` over its tokens i = 0, 1, ... Equal prefixes get equal hashes
    wherever they occur. Every row must start a span at position 0 (:func:`word_starts`, :func:`fixed_starts` do).
    """
    B, S = token_ids.shape
    first = start_index(starts)  # (B, S), >= 0
    pos = torch.arange(S, device=token_ids.device).expand(B, S)
    powers = [1]
    for _ in range(max_len - 1):
        powers.append(powers[-1] * HASH_BASE % HASH_MOD)
    power = torch.tensor(powers, dtype=torch.int64, device=token_ids.device)
    offset = (pos - first).clamp(max=max_len - 1)  # (B, S) the token's index in its span (beyond the cap: unused)
    term = (token_ids + 1) % HASH_MOD * power[offset] % HASH_MOD  # (B, S), each < 2^31
    total = term.cumsum(1)  # exact: S * 2^31 < 2^63
    last = torch.minimum(pos, first + max_len - 1)  # the prefix's last counted token
    before = torch.gather(total, 1, (first - 1).clamp(min=0)) * (first > 0)
    return (torch.gather(total, 1, last) - before) % HASH_MOD


def span_ends(starts: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: True at the last token of each span (the row's last position ends its span)."""
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    return ends


def full_span_hash(token_ids: torch.Tensor, starts: torch.Tensor, max_len: int = 16) -> torch.Tensor:
    """(B, S) int64 hash of the *whole* span containing each position. LOOKS AHEAD (reads up to the span end)."""
    B, S = token_ids.shape
    h = prefix_hash(token_ids, starts, max_len)
    idx = torch.arange(S, device=token_ids.device).expand(B, S)
    end_idx = torch.where(span_ends(starts), idx, torch.full_like(idx, S)).flip(1).cummin(dim=1).values.flip(1)
    return torch.gather(h, 1, end_idx)


def hold(values: torch.Tensor, first: torch.Tensor, state: dict[str, Any] | None, key: str) -> torch.Tensor:
    """(B, S, ...) values -> the values at each token's span start (causal: the start is <= t).

    ``first`` (B, S) is the index of the span's first token in this chunk (:func:`start_index`), -1 when the span
    began in an earlier decoding chunk: its value is then the one carried in ``state[key]`` (the layer's router
    state, None outside decoding), which this call updates with the chunk's last held value.
    """
    shape = (*first.shape, *([1] * (values.dim() - 2)))
    held = torch.gather(values, 1, first.clamp(min=0).view(shape).expand_as(values))
    if state is not None:
        if key in state:
            held = torch.where((first < 0).view(shape), state[key].unsqueeze(1), held)
        state[key] = held[:, -1]
    return held


class Spans(nn.Module):
    """A router's span definition, with the tokenizer's (V,) piece kinds as a buffer for word spans.

    Args:
        span: word or fixed spans.
        kinds: (V,) int8 :func:`piece_kinds` of the tokenizer (word spans only; saved in checkpoints).
    """

    def __init__(self, span: SpanDef, kinds: torch.Tensor | None = None) -> None:
        super().__init__()
        self.span = span
        if span.kind == "word":
            if kinds is None:
                raise ValueError("word spans need the tokenizer's piece kinds (resources.piece_kinds)")
            self.register_buffer("piece_kinds", kinds.to(torch.int8).clone())
        else:
            self.piece_kinds = None

    def history_starts(self, ctx: RoutingContext) -> torch.Tensor:
        """(B, S_hist) bool span starts over the whole history (which begins at position 0)."""
        hist = ctx.history_ids
        if self.span.kind == "fixed":
            pos = torch.arange(hist.shape[1], device=hist.device)
            return fixed_starts(pos, self.span.span_len).expand_as(hist)
        return word_starts(hist, self.piece_kinds)

    def first_in_chunk(self, ctx: RoutingContext) -> torch.Tensor:
        """(B, S) index in the current chunk of each token's span start; -1 when it lies in an earlier chunk."""
        return start_index(self.history_starts(ctx)[:, -ctx.seq_len :])
