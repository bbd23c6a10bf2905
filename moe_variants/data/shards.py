"""Tokenized shards on disk: fixed-width token ids, memory-mapped, with a document table.

A shard corpus is a directory::

    index.json                      format, dtype, domains, sources, tokenizer fingerprint, shards, content key
    train/shard-00000.tokens        raw little-endian uint16 token ids (the BOS that opens each document included)
    train/shard-00000.docs.npy      (n_docs,) structured array DOC_DTYPE: start, length, domain, source
    validation/<domain>.tokens      one token stream per domain
    validation/<domain>.docs.npy

Documents are stored back to back in a fixed order; a shard never splits a document. Training windows of
``L = seq_len + 1`` tokens are cut from each shard's stream independently (the < L tokens left at a shard's
end are not used), so a shard is a self-contained unit: a corpus whose later shards have not arrived yet is a
smaller corpus with the same windows in the shards it has.

Nothing here loads a whole shard: windows are sliced from ``numpy.memmap`` views and the document table is
searched with ``searchsorted``; :func:`iter_token_blocks` reads with plain file reads (no mapping) so that a pass
over all tokens does not grow the process's resident memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "moe-shards-1"
TOKEN_DTYPE = np.dtype("<u2")  # 65536 ids: the Mixtral vocabulary (32000) fits
DOC_DTYPE = np.dtype([("start", "<i8"), ("length", "<i4"), ("domain", "<u2"), ("source", "<u2")])
INDEX = "index.json"


def check_vocab(vocab_size: int) -> None:
    if vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(
            f"a vocabulary of {vocab_size} ids does not fit the shards' {TOKEN_DTYPE.name} token ids "
            f"(at most {np.iinfo(TOKEN_DTYPE).max + 1}): use a tokenizer with fewer ids"
        )


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(block):
            h.update(b)
    return h.hexdigest()


class StreamWriter:
    """Appends documents (token id arrays that already start with BOS) to ``<stem>.tokens`` / ``<stem>.docs.npy``."""

    def __init__(self, stem: Path) -> None:
        self.stem = stem
        stem.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(str(stem) + ".tokens.tmp", "wb")
        self._h = hashlib.sha256()
        self.n_tokens = 0
        self._docs: list[tuple[int, int, int, int]] = []

    def add(self, ids: np.ndarray, domain: int, source: int) -> None:
        data = np.ascontiguousarray(ids, dtype=TOKEN_DTYPE).tobytes()
        self._f.write(data)
        self._h.update(data)
        self._docs.append((self.n_tokens, len(ids), domain, source))
        self.n_tokens += len(ids)

    @property
    def n_docs(self) -> int:
        return len(self._docs)

    def close(self) -> dict:
        """Finish both files (atomically renamed into place); returns the shard's index entry."""
        self._f.close()
        docs = np.array(self._docs, dtype=DOC_DTYPE)
        tmp = str(self.stem) + ".docs.tmp.npy"
        np.save(tmp, docs)
        os.replace(tmp, str(self.stem) + ".docs.npy")
        os.replace(str(self.stem) + ".tokens.tmp", str(self.stem) + ".tokens")
        return {
            "name": self.stem.name,
            "tokens": self.n_tokens,
            "docs": len(docs),
            "sha256": self._h.hexdigest(),
            "docs_sha256": sha256_file(Path(str(self.stem) + ".docs.npy")),
        }


def write_index(root: Path, index: dict) -> None:
    index = {"format": FORMAT, "dtype": TOKEN_DTYPE.str, **index}
    tmp = root / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / INDEX)


def read_index(root: Path) -> dict:
    path = root / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"no {INDEX} in {root}: not a shard corpus (build one with `moe-data large`)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or np.dtype(index.get("dtype")) != TOKEN_DTYPE:
        raise ValueError(
            f"{path}: format {index.get('format')!r}/{index.get('dtype')!r}, expected {FORMAT!r}/{TOKEN_DTYPE.str!r}: "
            "rebuild it with this version of moe-data"
        )
    return index


@dataclass
class Stream:
    """One token stream on disk (a training shard, or one domain's validation split), opened lazily."""

    stem: Path
    n_tokens: int

    @property
    def tokens_path(self) -> Path:
        return Path(str(self.stem) + ".tokens")

    def tokens(self) -> np.ndarray:  # (n_tokens,) uint16, memory-mapped
        if self.n_tokens == 0:
            return np.zeros(0, dtype=TOKEN_DTYPE)
        return np.memmap(self.tokens_path, dtype=TOKEN_DTYPE, mode="r", shape=(self.n_tokens,))

    def docs(self) -> np.ndarray:  # (n_docs,) DOC_DTYPE, memory-mapped
        return np.load(str(self.stem) + ".docs.npy", mmap_mode="r")

    def complete(self) -> bool:
        p = self.tokens_path
        return p.is_file() and p.stat().st_size == self.n_tokens * TOKEN_DTYPE.itemsize and Path(
            str(self.stem) + ".docs.npy"
        ).is_file()


class ShardWindows:
    """Windows of ``window`` tokens cut from a list of streams, as a map-style dataset of dicts.

    Window ``i`` lies in the stream ``s`` with ``cum[s] <= i < cum[s + 1]`` at token offset ``(i - cum[s]) * window``.
    Items are the same dicts as ``datamodule.PackedWindows``: ``input_ids``/``labels`` (int64, window - 1),
    ``domain_ids`` (int64, the domain of each token's document) and ``doc_start`` (bool, the token opens a
    document).
    """

    def __init__(self, streams: Sequence[Stream], window: int, max_windows: int | None = None) -> None:
        self.streams = list(streams)
        self.window = window
        counts = np.array([s.n_tokens // window for s in self.streams], dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(counts)])
        self.n = int(self.cum[-1]) if max_windows is None else min(int(self.cum[-1]), int(max_windows))
        self._open: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.n

    def _stream(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if s not in self._open:  # memmaps: opening costs no memory, pages come and go with the page cache
            docs = self.streams[s].docs()
            self._open[s] = (self.streams[s].tokens(), np.asarray(docs["start"]), np.asarray(docs["domain"]))
        return self._open[s]

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memmaps
        return {**self.__dict__, "_open": {}}

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range ({self.n} windows)")
        s = int(np.searchsorted(self.cum, i, side="right") - 1)
        return s, int(i - self.cum[s]) * self.window

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(window,) int64 tokens, (window,) int64 domain ids, (window,) bool doc starts of window ``i``."""
        s, a = self.locate(i)
        tokens, starts, domains = self._stream(s)
        b = a + self.window
        toks = np.asarray(tokens[a:b], dtype=np.int64)
        first = int(np.searchsorted(starts, a, side="right") - 1)  # the document holding token a
        last = int(np.searchsorted(starts, b, side="left"))  # documents starting before b
        doc_of = np.searchsorted(starts[first:last], np.arange(a, b), side="right") - 1 + first
        dom = np.asarray(domains, dtype=np.int64)[doc_of]
        ds = np.zeros(self.window, dtype=bool)
        inside = starts[first:last]
        ds[inside[inside >= a] - a] = True
        return toks, dom, ds

    def __getitem__(self, i: int) -> dict:
        import torch

        toks, dom, ds = self.raw(int(i))
        w = torch.from_numpy(toks)
        return {
            "input_ids": w[:-1],
            "labels": w[1:],
            "domain_ids": torch.from_numpy(dom[:-1]),
            "doc_start": torch.from_numpy(ds[:-1]),
        }


def iter_token_blocks(streams: Sequence[Stream], window: int, max_windows: int | None = None,
                      windows_per_block: int = 4096) -> Iterator[np.ndarray]:
    """Every window's tokens once, as int64 (n, window) blocks, read with plain reads (no memory map)."""
    left = None if max_windows is None else int(max_windows)
    for st in streams:
        n = st.n_tokens // window
        if left is not None:
            n = min(n, left)
            left -= n
        with open(st.tokens_path, "rb") as f:
            for w0 in range(0, n, windows_per_block):
                k = min(windows_per_block, n - w0)
                block = np.fromfile(f, dtype=TOKEN_DTYPE, count=k * window)
                yield block.astype(np.int64).reshape(k, window)
        if left == 0:
            return
