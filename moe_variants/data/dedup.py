"""Exact and near-duplicate documents: MinHash signatures of token 5-gram shingles, banded LSH.

Shingles are hashed from token ids (the documents are tokenized anyway), vectorised with numpy: a signature
costs O(shingles x perms) integer operations and no Python loop per shingle. Two documents whose shingle sets
have Jaccard similarity J agree on each signature entry with probability J; with ``BANDS`` bands of ``ROWS`` rows
a pair becomes a candidate with probability 1 - (1 - J^ROWS)^BANDS (about 0.5 at J = 0.77, 0.98 at J = 0.9),
and a candidate counts as a duplicate when its estimated Jaccard (share of equal entries) is >= ``THRESHOLD``.
"""

from __future__ import annotations

import hashlib

import numpy as np

SHINGLE = 5
PERMS = 64
BANDS, ROWS = 8, 8
THRESHOLD = 0.8
_MASK61 = np.uint64((1 << 61) - 1)
_rng = np.random.default_rng(0x5EED)
_A = _rng.integers(1, 1 << 61, size=PERMS, dtype=np.uint64) | np.uint64(1)  # odd multipliers
_B = _rng.integers(0, 1 << 61, size=PERMS, dtype=np.uint64)
_BASE = np.uint64(0x9E3779B97F4A7C15)


def shingle_hashes(ids: np.ndarray, k: int = SHINGLE) -> np.ndarray:
    """(max(1, n - k + 1),) uint64 hashes of the k-grams of ``ids`` (one hash of the whole text if shorter)."""
    ids = np.asarray(ids, dtype=np.uint64) + np.uint64(1)
    if len(ids) < k:
        k = max(1, len(ids))
        if len(ids) == 0:
            return np.zeros(1, dtype=np.uint64)
    n = len(ids) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):  # polynomial rolling hash, wrapping mod 2^64
            h = h * _BASE + ids[j : j + n]
        h ^= h >> np.uint64(29)
    return h


def signature(ids: np.ndarray) -> np.ndarray:
    """(PERMS,) uint32 MinHash signature of a document's token ids (multiply-shift hash family)."""
    h = shingle_hashes(ids)
    with np.errstate(over="ignore"):
        mixed = h[:, None] * _A[None, :] + _B[None, :]  # (n, PERMS), mod 2^64
    return (mixed >> np.uint64(32)).min(axis=0).astype(np.uint32)


def text_hash(text: str) -> bytes:
    """16-byte digest of a document's text, whitespace-normalised (exact duplicates up to spacing)."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class NearDuplicateIndex:
    """Keeps the first of each group of exact or near-duplicate documents, in the order they are offered."""

    def __init__(self) -> None:
        self.exact: set[bytes] = set()
        self.bands: list[dict[bytes, int]] = [{} for _ in range(BANDS)]
        self.sigs: list[np.ndarray] = []
        self.exact_dups = 0
        self.near_dups = 0

    def offer(self, digest: bytes, sig: np.ndarray) -> bool:
        """True if the document is new (and is now indexed), False if it duplicates an earlier one."""
        if digest in self.exact:
            self.exact_dups += 1
            return False
        keys = [sig[b * ROWS : (b + 1) * ROWS].tobytes() for b in range(BANDS)]
        seen: set[int] = set()
        for b, key in enumerate(keys):
            j = self.bands[b].get(key)
            if j is not None and j not in seen:
                seen.add(j)
                if float(np.mean(self.sigs[j] == sig)) >= THRESHOLD:
                    self.near_dups += 1
                    return False
        i = len(self.sigs)
        self.sigs.append(sig)
        self.exact.add(digest)
        for b, key in enumerate(keys):
            self.bands[b].setdefault(key, i)
        return True
