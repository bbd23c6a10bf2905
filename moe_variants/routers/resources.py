"""What some routers are built from beyond their config: the tokenizer's word-span table, corpus token counts and
routing vocabularies.

A router that needs them declares ``needs_resources = True`` and takes a ``resources`` keyword; whoever builds
the model binds it into the router factory (:func:`bind_resources`: ``moe-train`` passes the training split's
:class:`RoutingResources`, ``moe-audit`` synthetic ones). Every table a router derives from them is a buffer, so a
checkpoint carries it: ``training.build.load_model`` rebuilds such routers with ``resources=FROM_CHECKPOINT``,
which makes them allocate placeholders that ``load_state_dict`` then fills (:func:`corpus_table`), with no corpus.

``RoutingResources`` computes its statistics lazily from the training split's token ids, once per run; routing
vocabularies are also cached on disk, keyed by corpus + tokenizer fingerprint, span definition and format version.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_variants.routers import spans

ROUTING_VOCAB_VERSION = 2  # 2: word spans from (previous, current) token, forward prefix hash, vocabulary units
UNITS = ("first_piece", "prefix", "whole_word")


class FromCheckpoint:
    """The ``resources`` of a router rebuilt to load a checkpoint: its corpus-derived buffers are placeholders
    that ``load_state_dict`` overwrites."""

    def __repr__(self) -> str:
        return "FROM_CHECKPOINT"


FROM_CHECKPOINT = FromCheckpoint()


def require(resources: Any, what: str) -> RoutingResources:
    """``resources`` as :class:`RoutingResources`, or a clear error naming what needed them."""
    if not isinstance(resources, RoutingResources):
        raise ValueError(
            f"{what} is built from the tokenizer and the training corpus, but the router got resources="
            f"{resources!r}: build the model through moe-train (it binds the training split's RoutingResources), or "
            f"bind them yourself: routers.resources.bind_resources(factory, RoutingResources(...))"
        )
    return resources


def corpus_table(resources: Any, shape: tuple[int, ...], build: Callable[[], torch.Tensor],
                 dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``build()``, or a zero placeholder of ``shape`` when rebuilding from a checkpoint (``FROM_CHECKPOINT``)."""
    return torch.zeros(shape, dtype=dtype) if resources is FROM_CHECKPOINT else build()


def bind_resources(factory: Callable[..., Any], resources: Any) -> Callable[..., Any]:
    """The router factory with ``resources=`` bound when its router class declares ``needs_resources``."""
    target = factory.func if isinstance(factory, functools.partial) else factory
    if getattr(target, "needs_resources", False):
        return functools.partial(factory, resources=resources)
    return factory


def word_span_kinds(span: spans.SpanDef, resources: Any, vocab_size: int) -> torch.Tensor | None:
    """The (V,) piece kinds a word-span router keeps (None for fixed spans, which need no tokenizer)."""
    if span.kind != "word":
        return None

    def build() -> torch.Tensor:
        kinds = require(resources, "a word-span router's piece table").piece_kinds
        if kinds.numel() != vocab_size:
            raise ValueError(f"the tokenizer has {kinds.numel()} pieces but model.vocab_size={vocab_size}: set "
                             f"model.vocab_size={kinds.numel()} or pick the matching data.tokenizer")
        return kinds

    return corpus_table(resources, (vocab_size,), build, dtype=torch.int8)


# -- routing vocabularies --------------------------------------------------------------------------------------
@dataclass
class RoutingVocab:
    """The ``size`` most frequent span keys of the corpus, each with its own routing id (0 = most frequent).

    What is counted (``unit``): ``first_piece`` the first token of every span, ``prefix`` every span prefix (the
    tokens from the span start up to each token, capped at ``max_len``), ``whole_word`` every complete span. A
    key is identified by its :func:`spans.prefix_hash`.
    """

    hashes: torch.Tensor  # (size,) int64 sorted key hashes; unused slots hold -1 and sort first
    ranks: torch.Tensor  # (size,) int64 frequency rank (= routing id) of each entry of ``hashes``
    unit: str
    max_len: int
    tokenizer_fingerprint: str
    version: int = ROUTING_VOCAB_VERSION


def lookup_routing_ids(
    key_hash: torch.Tensor, hashes: torch.Tensor, ranks: torch.Tensor, num_buckets: int
) -> torch.Tensor:
    """Routing ids (shape of ``key_hash``): the rank of a key in the vocabulary's sorted ``hashes``, else one of
    ``num_buckets`` hashed ids ``size + hash % num_buckets`` shared by the keys outside it."""
    key_hash = key_hash.contiguous()
    pos = torch.searchsorted(hashes, key_hash).clamp(max=hashes.numel() - 1)
    found = hashes[pos] == key_hash
    return torch.where(found, ranks[pos], hashes.numel() + key_hash % num_buckets)


def unit_keys(token_ids: torch.Tensor, starts: torch.Tensor, unit: str, max_len: int) -> tuple[torch.Tensor, ...]:
    """(hashes (N,), lengths (N,)) of every ``unit`` occurrence in (B, S) ``token_ids`` with span ``starts``."""
    if unit not in UNITS:
        raise ValueError(f"unknown routing-vocabulary unit {unit!r}; choices: {list(UNITS)}")
    h = spans.prefix_hash(token_ids, starts, max_len)  # (B, S)
    pos = torch.arange(token_ids.shape[1], device=token_ids.device).expand_as(token_ids)
    length = (pos - spans.start_index(starts) + 1).clamp(max=max_len)
    keep = {"first_piece": starts, "prefix": torch.ones_like(starts), "whole_word": spans.span_ends(starts)}[unit]
    return h[keep], length[keep]


def build_routing_vocab(
    token_chunks: Iterable[torch.Tensor], span_starts: Callable[[torch.Tensor], torch.Tensor], unit: str, size: int,
    max_len: int, tokenizer_fingerprint: str,
) -> RoutingVocab:
    """Count ``unit`` keys over (B, S) token chunks; keep the ``size`` most frequent (ties: shorter, then by hash,
    so every prefix of a kept prefix is kept too: a prefix occurs at least as often as its extensions)."""
    hashes, counts, lengths = (torch.empty(0, dtype=torch.int64) for _ in range(3))
    for chunk in token_chunks:
        h, n = unit_keys(chunk, span_starts(chunk), unit, max_len)
        hashes, inverse = torch.unique(torch.cat([hashes, h]), return_inverse=True)
        counts = torch.zeros_like(hashes).index_add_(0, inverse, torch.cat([counts, torch.ones_like(h)]))
        lengths = torch.zeros_like(hashes).scatter_reduce(0, inverse, torch.cat([lengths, n]), "amax")
    if not hashes.numel():
        raise ValueError("cannot build a routing vocabulary from an empty corpus")
    order = torch.arange(hashes.numel())  # by hash (torch.unique sorts); stable sorts by length, then by count
    order = order[lengths[order].argsort(stable=True)]
    order = order[counts[order].neg().argsort(stable=True)][:size]
    top = hashes[order]  # (n,) by rank
    by_hash = top.argsort()
    n_pad = size - top.numel()  # unused slots (-1) sort first; they never match (hashes are >= 0)
    vocab_hashes = torch.cat([torch.full((n_pad,), -1, dtype=torch.int64), top[by_hash]])
    vocab_ranks = torch.cat([torch.arange(top.numel(), size), by_hash])
    return RoutingVocab(vocab_hashes, vocab_ranks, unit, max_len, tokenizer_fingerprint)


def count_tokens(chunks: Iterable[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(V,) float64 occurrences of each token id in an iterable of id tensors (any shape)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for chunk in chunks:
        counts += torch.bincount(chunk.reshape(-1), minlength=vocab_size).double()
    return counts


class RoutingResources:
    """Lazily computed tokenizer and corpus statistics for router construction.

    Args:
        token_chunks: returns an iterable of (B, S) int64 token-id tensors of the training split.
        piece_kinds: (V,) int8 :func:`spans.piece_kinds` of the tokenizer's vocabulary (word spans).
        tokenizer_fingerprint: identifies the tokenizer; saved with routing vocabularies and checked on load.
        cache_dir: where routing vocabularies are cached (None: no disk cache).
        cache_key: identifies corpus + tokenizer for the disk cache (default: the tokenizer fingerprint).
    """

    def __init__(
        self, token_chunks: Callable[[], Iterable[torch.Tensor]], piece_kinds: torch.Tensor,
        tokenizer_fingerprint: str, cache_dir: str | Path | None = None, cache_key: str | None = None,
    ) -> None:
        self.cache_key = cache_key or tokenizer_fingerprint
        self._token_chunks = token_chunks
        self.piece_kinds = piece_kinds.to(torch.int8)
        self.vocab_size = piece_kinds.numel()
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._counts: torch.Tensor | None = None
        self._vocabs: dict[tuple[Any, ...], RoutingVocab] = {}

    @classmethod
    def from_datamodule(cls, dm: Any, cache_dir: str | Path | None = None) -> RoutingResources:
        """From a set-up data module exposing ``train_token_chunks()``, ``vocab_pieces`` (SentencePiece notation),
        ``special_token_ids``, ``tokenizer_fingerprint`` and ``data_fingerprint`` (corpus + tokenizer + packing)."""
        kinds = spans.piece_kinds(dm.vocab_pieces, dm.special_token_ids)
        return cls(dm.train_token_chunks, kinds, dm.tokenizer_fingerprint, cache_dir,
                   cache_key=getattr(dm, "data_fingerprint", None))

    def token_counts(self) -> torch.Tensor:
        """(V,) float64 occurrences of each token id in the training split."""
        if self._counts is None:
            counts = count_tokens(self._token_chunks(), self.vocab_size)
            if counts.sum() == 0:
                raise ValueError("the training split has no tokens: cannot compute token counts")
            self._counts = counts
        return self._counts

    def span_starts(self, span: spans.SpanDef) -> Callable[[torch.Tensor], torch.Tensor]:
        """(B, S) token ids -> (B, S) span starts of ``span`` (every row a sequence from its position 0)."""
        if span.kind == "fixed":
            return lambda ids: spans.fixed_starts(torch.arange(ids.shape[1]), span.span_len).expand_as(ids)
        return lambda ids: spans.word_starts(ids, self.piece_kinds)

    def routing_vocab(self, unit: str, size: int, max_len: int, span: spans.SpanDef) -> RoutingVocab:
        """The ``size`` most frequent ``unit`` keys of ``span`` spans in the training split (cached)."""
        key = (unit, size, max_len, span.kind, span.span_len)
        if key in self._vocabs:
            return self._vocabs[key]
        path = None
        if self.cache_dir is not None:
            tag = hashlib.sha256(f"{self.cache_key}-{key}-v{ROUTING_VOCAB_VERSION}".encode()).hexdigest()
            path = self.cache_dir / f"routing_vocab-{unit}-{size}-{max_len}-{span.describe()}-{tag[:16]}.pt"
        if path is not None and path.is_file():
            vocab = RoutingVocab(**torch.load(path))
        else:
            vocab = build_routing_vocab(self._token_chunks(), self.span_starts(span), unit, size, max_len,
                                        self.tokenizer_fingerprint)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                    torch.save(vars(vocab), tmp)
                os.replace(tmp.name, path)
        self._vocabs[key] = vocab
        return vocab


def synthetic_resources(vocab_size: int, seed: int = 0) -> RoutingResources:
    """Random piece kinds (about 2.5 tokens per word, like real text) and a random corpus: for auditing and
    testing routers that need resources without a tokenizer or data."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.where(torch.rand(vocab_size, generator=g) < 0.4, spans.WORD, spans.CONT).to(torch.int8)
    kinds[torch.rand(vocab_size, generator=g) < 0.1] = spans.PUNCT
    corpus = torch.randint(0, vocab_size, (64, 128), generator=g)
    return RoutingResources(lambda: [corpus], kinds, "synthetic")
