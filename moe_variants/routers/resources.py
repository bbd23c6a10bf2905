"""Corpus-derived inputs that some routers need when they are built: token counts and routing vocabularies.

``RoutingResources`` computes them lazily from the training split's token ids, once per run; routing
vocabularies are also cached on disk, keyed by corpus+tokenizer fingerprint and format version. Built
tables end up as buffers in the routers, so a checkpoint carries everything needed to route again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_variants.routers import spans

ROUTING_VOCAB_VERSION = 1


@dataclass
class RoutingVocab:
    """MoWE-style routing vocabulary over word spans (arXiv 2311.10768).

    The ``size`` most frequent words of the corpus (as token-id spans, identified by their span hash) get
    their own routing id, ``0`` being the most frequent; every other span shares one of ``num_buckets`` hashed
    ids ``size + hash % num_buckets``.
    """

    hashes: torch.Tensor  # (size,) int64 sorted span hashes; unused slots hold -1
    ranks: torch.Tensor  # (size,) int64 frequency rank (= routing id) of each entry of ``hashes``
    num_buckets: int
    max_len: int
    tokenizer_fingerprint: str
    version: int = ROUTING_VOCAB_VERSION


def lookup_routing_ids(
    span_hash: torch.Tensor, hashes: torch.Tensor, ranks: torch.Tensor, num_buckets: int
) -> torch.Tensor:
    """Routing ids (shape of ``span_hash``) from a vocabulary's sorted ``hashes`` and their ``ranks``."""
    span_hash = span_hash.contiguous()
    pos = torch.searchsorted(hashes, span_hash).clamp(max=hashes.numel() - 1)
    found = hashes[pos] == span_hash
    return torch.where(found, ranks[pos], hashes.numel() + span_hash % num_buckets)


def build_routing_vocab(
    token_chunks: Iterable[torch.Tensor], word_start_table: torch.Tensor, size: int, num_buckets: int,
    max_len: int, tokenizer_fingerprint: str,
) -> RoutingVocab:
    """Count complete word spans over (B, S) token chunks; keep the ``size`` most frequent."""
    counts: dict[int, int] = {}
    for chunk in token_chunks:
        starts = spans.word_starts(chunk, word_start_table)
        full = spans.full_span_hash(chunk, starts, max_len)[starts]  # one hash per span
        values, n = torch.unique(full, return_counts=True)
        for h, c in zip(values.tolist(), n.tolist()):
            counts[h] = counts.get(h, 0) + c
    if not counts:
        raise ValueError("cannot build a routing vocabulary from an empty corpus")
    top = sorted(counts.items(), key=lambda hc: (-hc[1], hc[0]))[:size]
    hashes = torch.full((size,), -1, dtype=torch.int64)
    ranks = torch.arange(size, dtype=torch.int64)
    order = sorted(range(len(top)), key=lambda i: top[i][0])
    # unused slots (-1) sort first; real entries after them in hash order
    n_pad = size - len(top)
    hashes[n_pad:] = torch.tensor([top[i][0] for i in order], dtype=torch.int64)
    ranks[n_pad:] = torch.tensor(order, dtype=torch.int64)
    ranks[:n_pad] = torch.arange(len(top), size)  # never matched (span hashes are >= 0)
    return RoutingVocab(hashes, ranks, num_buckets, max_len, tokenizer_fingerprint)


def count_tokens(chunks: Iterable[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(V,) float64 occurrences of each token id in an iterable of id tensors (any shape)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for chunk in chunks:
        counts += torch.bincount(chunk.reshape(-1), minlength=vocab_size).double()
    return counts


class RoutingResources:
    """Lazily computed corpus statistics for router construction.

    Args:
        token_chunks: returns an iterable of (B, S) int64 token-id tensors of the training split.
        vocab_size: tokenizer vocabulary size.
        word_start_table: (V,) bool word-start table of the tokenizer.
        tokenizer_fingerprint: identifies the tokenizer; saved with routing vocabularies and checked on load.
        cache_dir: where routing vocabularies are cached (None: no disk cache).
        cache_key: identifies corpus + tokenizer for the disk cache (default: the tokenizer fingerprint).
    """

    def __init__(
        self, token_chunks: Callable[[], Iterable[torch.Tensor]], vocab_size: int, word_start_table: torch.Tensor,
        tokenizer_fingerprint: str, cache_dir: str | Path | None = None, cache_key: str | None = None,
    ) -> None:
        self.cache_key = cache_key or tokenizer_fingerprint
        self._token_chunks = token_chunks
        self.vocab_size = vocab_size
        self.word_start_table = word_start_table
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._counts: torch.Tensor | None = None
        self._vocabs: dict[tuple[int, int, int], RoutingVocab] = {}

    @classmethod
    def from_datamodule(cls, dm, cache_dir: str | Path | None = None) -> RoutingResources:  # noqa: ANN001
        """From a set-up data module exposing ``train_token_chunks()``, ``vocab_size``, ``word_start_table``,
        ``tokenizer_fingerprint`` and ``data_fingerprint`` (corpus + tokenizer + packing)."""
        return cls(dm.train_token_chunks, dm.vocab_size, dm.word_start_table, dm.tokenizer_fingerprint, cache_dir,
                   cache_key=getattr(dm, "data_fingerprint", None))

    def token_counts(self) -> torch.Tensor:
        """(V,) float64 occurrences of each token id in the training split."""
        if self._counts is None:
            counts = count_tokens(self._token_chunks(), self.vocab_size)
            if counts.sum() == 0:
                raise ValueError("the training split has no tokens: cannot compute token counts")
            self._counts = counts
        return self._counts

    def routing_vocab(self, size: int, num_buckets: int, max_len: int) -> RoutingVocab:
        key = (size, num_buckets, max_len)
        if key in self._vocabs:
            return self._vocabs[key]
        path = None
        if self.cache_dir is not None:
            tag = hashlib.sha256(f"{self.cache_key}-{key}-v{ROUTING_VOCAB_VERSION}".encode()).hexdigest()
            path = self.cache_dir / f"routing_vocab-{size}-{num_buckets}-{max_len}-{tag[:16]}.pt"
        if path is not None and path.is_file():
            vocab = RoutingVocab(**torch.load(path))
        else:
            vocab = build_routing_vocab(self._token_chunks(), self.word_start_table, size, num_buckets, max_len,
                                        self.tokenizer_fingerprint)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                    torch.save(vars(vocab), tmp)
                os.replace(tmp.name, path)
        self._vocabs[key] = vocab
        return vocab
