"""Data modules over tokenized shards on disk (``moe_variants.data.shards``): the large corpus, and any
``datasets`` source tokenized once into the same format.

Both offer the interface of ``CorpusDataModule`` (batch keys ``input_ids``, ``labels``, ``domain_ids``,
``doc_start``; ``vocab_size``, ``domains``, one validation loader per domain,
``train_token_chunks``, ``tokenizer_fingerprint``, ``data_fingerprint``) and its resume contract: the training
stream is ``ResumableSampler`` over the shards' windows, so the stream position is ``global_step x batch_size x
accumulate_grad_batches x world_size``, exactly. Nothing loads the corpus into memory: windows are read from
memory-mapped shards as batches are drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_variants import paths
from moe_variants.data import shards
from moe_variants.data.datamodule import CorpusDataModule, PackedWindows, _resolve

SHARD_VERSION = "s1"  # bump when DatasetsDataModule's tokenisation output changes (invalidates its cache)


class ShardDataModule(CorpusDataModule):
    """A shard corpus built by ``moe-data large`` (default ``DATA_ROOT/corpus_large``).

    Args:
        corpus_dir: the directory holding ``index.json``.
        allow_partial: train on the training shards that are complete (e.g. while ``moe-data unpack`` still
            waits for pieces) instead of failing; validation files must be there.
        Other args as :class:`CorpusDataModule`. ``domains`` may only name a subset for validation-side use
        if it equals the corpus domains: training windows mix all domains.
    """

    def __init__(self, corpus_dir: str | os.PathLike[str] | None = None, allow_partial: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(corpus_dir=corpus_dir if corpus_dir is not None else paths.data_root() / "corpus_large",
                         **kwargs)
        if corpus_dir is not None:
            self.corpus_dir = _resolve(corpus_dir)
        self.allow_partial = allow_partial

    # ------------------------------------------------------------ corpus description

    @cached_property
    def index(self) -> dict:
        if not (self.corpus_dir / shards.INDEX).is_file():
            raise ValueError(
                f"no shard corpus at {self.corpus_dir}: build it with `moe-data large` (or `moe-data unpack` the "
                f"pieces of one), or point data.corpus_dir at it"
            )
        return shards.read_index(self.corpus_dir)

    @property
    def source_name(self) -> str:
        return str(self.corpus_dir)

    @cached_property
    def domains(self) -> list[str]:
        available = list(self.index["domains"])
        if self.requested_domains is not None and self.requested_domains != sorted(available):
            unknown = [d for d in self.requested_domains if d not in available]
            if unknown:
                raise ValueError(f"domain(s) {unknown} not in {self.source_name}; available: {', '.join(available)}")
            raise ValueError(
                f"the shards of {self.source_name} mix all its domains ({', '.join(available)}): a domain subset "
                "cannot be trained on; build a corpus of those domains (`moe-data large --domains ...`)"
            )
        return available

    def content_key(self) -> str:
        return str(self.index["content_sha256"]) + "|" + ",".join(s.stem.name for s in self.train_streams)

    def load_raw(self):  # noqa: ANN201
        raise TypeError("a shard corpus has no raw text splits")

    def _check_tokenizer(self) -> None:
        want = self.index.get("tokenizer_fingerprint")
        if want and want != self.tokenizer_fingerprint:
            raise ValueError(
                f"{self.source_name} was tokenized with another tokenizer (fingerprint {want[:12]}…) than "
                f"data.tokenizer={self.tokenizer_name!r} ({self.tokenizer_fingerprint[:12]}…): use that tokenizer or "
                "rebuild the shards"
            )

    @cached_property
    def train_streams(self) -> list[shards.Stream]:
        entries = self.index["train"]  # (resolves corpus_dir for DatasetsDataModule first)
        streams = [shards.Stream(self.corpus_dir / "train" / s["name"], int(s["tokens"])) for s in entries]
        missing = [s.stem.name for s in streams if not s.complete()]
        if missing:
            if not self.allow_partial or len(missing) == len(streams):
                raise ValueError(
                    f"{len(missing)} of {len(streams)} training shards of {self.source_name} are missing or "
                    f"incomplete ({', '.join(missing[:4])}{'…' if len(missing) > 4 else ''}): finish "
                    "`moe-data unpack`, or set data.allow_partial=true to train on the complete ones"
                )
            warnings.warn(f"training on {len(streams) - len(missing)} of {len(streams)} shards "
                          f"({len(missing)} not received yet)", stacklevel=2)
        return [s for s in streams if s.complete()]

    # ------------------------------------------------------------ setup

    def prepare_data(self) -> None:
        self._check_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        if self.train_windows is not None:
            return
        self._check_tokenizer()
        L = self.seq_len + 1
        max_windows = None
        if self.max_train_tokens is not None:
            max_windows = self.max_train_tokens // L
            if max_windows < 1:
                raise ValueError(f"max_train_tokens={self.max_train_tokens} is less than one window of "
                                 f"seq_len + 1 = {L} tokens")
        windows = shards.ShardWindows(self.train_streams, L, max_windows)
        if len(windows) == 0:
            raise ValueError(f"the training shards of {self.source_name} hold fewer than seq_len + 1 = {L} tokens "
                             "each: lower seq_len or build more data")
        self.train_windows = windows  # type: ignore[assignment]
        self.val_windows = [self._val_windows(d) for d in self.domains]

    def _val_windows(self, domain: str) -> PackedWindows:
        entry = self.index["validation"].get(domain)
        stream = shards.Stream(self.corpus_dir / "validation" / domain, int(entry["tokens"]) if entry else 0)
        L = self.seq_len + 1
        if entry is None or not stream.complete() or stream.n_tokens < L:
            raise ValueError(
                f"the validation split of {self.source_name} has no {domain!r} windows of {L} tokens: rebuild the "
                "corpus with a validation package for that domain (or lower seq_len)"
            )
        k = min(stream.n_tokens // L, self.val_sequences_per_domain)
        if k < self.val_sequences_per_domain:
            warnings.warn(f"domain {domain!r} has only {k} validation windows of {L} tokens "
                          f"(asked for {self.val_sequences_per_domain})", stacklevel=2)
        w = shards.ShardWindows([stream], L, k)
        parts = [w.raw(i) for i in range(k)]
        return PackedWindows(*(np.concatenate([p[j] for p in parts]) for j in range(3)), L)  # small: in memory

    # ------------------------------------------------------------ token statistics

    def train_token_chunks(self, windows_per_chunk: int = 4096) -> Iterator[torch.Tensor]:
        """Every training token once, as int64 (n, seq_len + 1) blocks, read without memory-mapping."""
        if self.train_windows is None:
            self.setup("fit")
        for block in shards.iter_token_blocks(self.train_streams, self.seq_len + 1, len(self.train_windows),
                                              windows_per_chunk):
            yield torch.from_numpy(block)


# ---------------------------------------------------------------- any `datasets` source


class DatasetsDataModule(ShardDataModule):
    """Any ``datasets.load_dataset`` source, tokenized once into shards cached by fingerprint.

    Args:
        path: a ``load_dataset`` path: a builder (``json``, ``parquet``, ``csv``, ``text``), a local dataset
            directory or script, or a hub name (needs the network unless already in the ``datasets`` cache).
        name: the dataset's config name.
        data_files / data_dir: as ``load_dataset``.
        split: the training split(s): a name or a list (concatenated).
        validation_split: the validation split; None holds out ``validation_fraction`` of the training documents
            per domain (by content hash).
        revision: a git revision of a hub dataset (part of the fingerprint: pin it).
        text_column / domain_column: the columns holding the text and the domain (documents without a domain
            column are domain ``default_domain``).
        streaming: read the source as an ``IterableDataset`` (nothing is downloaded or converted up front).
        cache_dir: where tokenized shards are kept (default ``DATA_ROOT/cache/shards``).
        shard_tokens: tokens per training shard.
        Other args as :class:`CorpusDataModule`.

    Local files are hashed (contents) into the fingerprint, so an edited file is tokenized again and an unchanged
    one never is; for a remote source the fingerprint is the arguments (pin ``revision``).
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
        data_dir: str | None = None,
        split: str | Sequence[str] = "train",
        validation_split: str | None = None,
        revision: str | None = None,
        text_column: str = "text",
        domain_column: str | None = "domain",
        default_domain: str = "all",
        streaming: bool = False,
        validation_fraction: float = 0.05,
        cache_dir: str | os.PathLike[str] | None = None,
        shard_tokens: int = 1 << 24,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("corpus_dir", None)
        super().__init__(corpus_dir=None, **kwargs)
        self.path, self.name, self.data_dir, self.revision = str(path), name, data_dir, revision
        self.data_files = _plain(data_files)
        self.splits = [split] if isinstance(split, str) else list(split)
        self.validation_split = validation_split
        self.text_column, self.domain_column, self.default_domain = text_column, domain_column, default_domain
        self.streaming, self.validation_fraction, self.shard_tokens = streaming, validation_fraction, shard_tokens
        self.cache_root = Path(cache_dir) if cache_dir else paths.data_root() / "cache" / "shards"
        self.tokenized_now = False  # True when this instance tokenized the source (False: cache hit)

    @property
    def source_name(self) -> str:
        return self.path + (f" ({self.name})" if self.name else "")

    def local_files(self) -> list[Path]:
        """The local files the source reads (hashed into the fingerprint)."""
        from moe_variants.data.datamodule import _expand

        pats: list[str] = []
        df = self.data_files
        if isinstance(df, Mapping):
            for v in df.values():
                pats += [v] if isinstance(v, str) else list(v)
        elif df is not None:
            pats += [df] if isinstance(df, str) else list(df)
        files = _expand(pats) if pats else []
        p = Path(self.path).expanduser()
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and ".cache" not in f.parts)
        if self.data_dir and Path(self.data_dir).is_dir():
            files += sorted(f for f in Path(self.data_dir).rglob("*") if f.is_file())
        return files

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        args = {k: getattr(self, k) for k in ("path", "name", "data_files", "data_dir", "splits", "validation_split",
                                               "revision", "text_column", "domain_column", "default_domain",
                                               "validation_fraction", "shard_tokens")}
        h.update(json.dumps(args, sort_keys=True, default=str).encode())
        h.update(f"{SHARD_VERSION}|{self.tokenizer_fingerprint}".encode())
        for f in self.local_files():
            h.update(f"{f.name}|{f.stat().st_size}|{shards.sha256_file(f)}".encode())
        return h.hexdigest()

    @cached_property
    def index(self) -> dict:
        self.corpus_dir = self.cache_root / self.fingerprint[:24]
        if not (self.corpus_dir / shards.INDEX).is_file():
            from moe_variants.data.hf_source import tokenize_source

            tokenize_source(self, self.corpus_dir)
            self.tokenized_now = True
        return shards.read_index(self.corpus_dir)


def _plain(v: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (for load_dataset and the fingerprint)."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, (str, bytes))):
        return [_plain(x) for x in v]
    return v
