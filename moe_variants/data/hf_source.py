"""Tokenize a ``datasets`` source into shards (for ``DatasetsDataModule``): streamed row by row, in batches
tokenized on all cores (``tokenizers``' ``encode_batch``), written as it goes; never the whole source in memory."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moe_variants.data import shards
from moe_variants.data.tokenizer import bos_id

BATCH = 512


class _Remap:
    """Domain names -> provisional ids in order of first appearance (sorted ids are assigned at the end)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        return self.ids.setdefault(name, len(self.ids))


def _is_network_error(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return any(w in text for w in ("offline", "connection", "couldn't reach", "could not reach", "hub",
                                    "network", "resolve", "timed out", "max retries"))


def load_split(dm: Any, split: str):  # noqa: ANN201  (-> datasets.Dataset | IterableDataset)
    import datasets

    kw = {k: v for k, v in (("name", dm.name), ("data_files", dm.data_files), ("data_dir", dm.data_dir),
                            ("revision", dm.revision)) if v is not None}
    try:
        return datasets.load_dataset(dm.path, split=split, streaming=dm.streaming, **kw)
    except ValueError as e:
        if "corresponds to no data" in str(e):
            raise ValueError(f"split {split!r} of {dm.source_name} is empty: choose another split or add data") from e
        if "split" in str(e).lower():
            raise ValueError(f"{dm.source_name} has no split {split!r} ({e}): set data.split / "
                             "data.validation_split to one of its splits") from e
        raise ValueError(f"could not load {dm.source_name} split {split!r}: {e}") from e
    except Exception as e:  # noqa: BLE001
        if _is_network_error(e) or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise ValueError(
                f"{dm.source_name} needs the network ({type(e).__name__}: {str(e)[:200]}); this machine is offline "
                f"(HF_DATASETS_OFFLINE={os.environ.get('HF_DATASETS_OFFLINE', 'unset')}): download the dataset "
                "elsewhere and point data.path (or data.data_files) at the local copy"
            ) from e
        raise ValueError(f"could not load {dm.source_name} split {split!r}: {type(e).__name__}: {e}") from e


def rows(dm: Any, split: str) -> Iterator[tuple[str, str]]:
    """(text, domain) of every row of one split; clear errors for a missing column or an empty split."""
    ds = load_split(dm, split)
    cols = ds.column_names
    if cols is None:  # some streamed sources only know their columns after the first row
        first = next(iter(ds), None)
        cols = list(first) if first else []
    if dm.text_column not in cols:
        raise ValueError(f"{dm.source_name} split {split!r} has no text column {dm.text_column!r} (columns: "
                         f"{cols}): set data.text_column")
    has_domain = bool(dm.domain_column) and dm.domain_column in cols
    n = 0
    for row in ds:
        n += 1
        text = row[dm.text_column]
        yield ("" if text is None else str(text)), (str(row[dm.domain_column]) if has_domain else dm.default_domain)
    if n == 0:
        raise ValueError(f"split {split!r} of {dm.source_name} is empty: choose another split or add data")


def _is_val(text: str, fraction: float) -> bool:
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def tokenize_source(dm: Any, out: Path) -> None:
    """Tokenize ``dm``'s source into a shard corpus at ``out`` (atomically: a half-written cache is never used)."""
    tok = dm.tokenizer
    shards.check_vocab(tok.get_vocab_size(with_added_tokens=True))
    bos = bos_id(tok)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    t0, n_docs, n_tok = time.time(), 0, 0
    domains = _Remap()
    train: list[shards.StreamWriter] = []
    val: dict[str, shards.StreamWriter] = {}

    def train_writer() -> shards.StreamWriter:
        if not train or train[-1].n_tokens >= dm.shard_tokens:
            train.append(shards.StreamWriter(tmp / "train" / f"shard-{len(train):05d}"))
        return train[-1]

    def val_writer(d: str) -> shards.StreamWriter:
        if d not in val:
            val[d] = shards.StreamWriter(tmp / "validation" / f"p{len(val):04d}")
        return val[d]

    sources = [(s, False) for s in dm.splits] + ([(dm.validation_split, True)] if dm.validation_split else [])
    for split, is_val_split in sources:
        batch: list[tuple[str, str]] = []

        def flush() -> None:
            nonlocal n_docs, n_tok
            encs = tok.encode_batch([t for t, _ in batch], add_special_tokens=False)  # all cores (rayon)
            for (text, d), e in zip(batch, encs):
                ids = np.asarray([bos, *e.ids], dtype=shards.TOKEN_DTYPE)
                # without a validation split: a content-hash share, and the first document of each domain (so that
                # every domain has one, which a streamed source cannot arrange afterwards)
                held_out = is_val_split or (dm.validation_split is None and (
                    d not in domains.ids or _is_val(text, dm.validation_fraction)))
                (val_writer(d) if held_out else train_writer()).add(ids, domains(d), 0)
                n_docs += 1
                n_tok += len(ids)
            batch.clear()
            if n_docs % (BATCH * 50) < BATCH:
                print(f"moe-data: tokenizing {dm.source_name}: {n_docs} documents, {n_tok / 1e6:.1f}M tokens "
                      f"({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)

        for text, d in rows(dm, split):
            if text.strip():
                batch.append((text, d))
            if len(batch) >= BATCH:
                flush()
        if batch:
            flush()
    if not train or sum(w.n_tokens for w in train) == 0:
        raise ValueError(f"{dm.source_name}: no non-empty training documents (all rows empty, or all held out): "
                         "add data or lower validation_fraction")
    names = sorted(domains.ids)
    remap = np.zeros(len(names), dtype=np.uint16)
    for new, name in enumerate(names):
        remap[domains.ids[name]] = new
    train_entries = [_close_remapped(w, remap) for w in train]
    val_entries = {}
    for d, w in val.items():
        entry = _close_remapped(w, remap)
        final = tmp / "validation" / d
        for ext in (".tokens", ".docs.npy"):
            os.replace(str(w.stem) + ext, str(final) + ext)
        val_entries[d] = {**entry, "name": d}
    content = hashlib.sha256("|".join([e["sha256"] for e in train_entries] + sorted(
        f"{d}:{e['sha256']}" for d, e in val_entries.items())).encode()).hexdigest()
    shards.write_index(tmp, {
        "domains": names,
        "sources": [dm.source_name],
        "tokenizer_fingerprint": dm.tokenizer_fingerprint,
        "bos_id": bos,
        "content_sha256": content,
        "train": train_entries,
        "validation": val_entries,
    })
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out)
    print(f"moe-data: tokenized {dm.source_name}: {n_docs} documents, {n_tok / 1e6:.2f}M tokens, "
          f"{len(train_entries)} shards in {time.time() - t0:.1f}s -> {out}", file=sys.stderr, flush=True)


def _close_remapped(w: shards.StreamWriter, remap: np.ndarray) -> dict:
    w._docs = [(a, n, int(remap[d]), s) for a, n, d, s in w._docs]  # provisional -> sorted domain ids
    return w.close()
