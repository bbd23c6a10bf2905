"""Lightning data modules: tokenise, pack into fixed windows, and serve resumable, deterministic batches.

A batch is a dict of (B, S) tensors:

* ``input_ids`` int64, ``labels`` int64 (the next token of each position),
* ``domain_ids`` int64 (index into ``dm.domains``, a sorted list of names, of the document the token belongs to),
* ``doc_start`` bool (the token is the BOS that opens a document).

Every document gets a BOS in front; documents are concatenated in a fixed shuffled order and cut into windows
of ``seq_len + 1`` tokens. Training reads one endless stream of per-epoch permutations seeded by ``seed`` (the
trainer stops it at ``max_steps``); the stream's position is part of every checkpoint (the data module's
``state_dict``), so a resumed run reads exactly the windows the uninterrupted run would have read, whatever step it
stopped at. Validation has one loader per domain (the first windows of its validation split).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from moe_variants import paths
from moe_variants.data.tokenizer import bos_id, load_tokenizer, special_token_ids, tokenizer_fingerprint, vocab_pieces

PACK_SEED = 20240229  # the document order used for packing: fixed, so every seed trains on the same windows
_TOKENIZE_VERSION = "v1"  # bump when the tokenisation output format changes (invalidates datasets' cache)


class PackedWindows(Dataset):
    """Windows of ``L = seq_len + 1`` tokens cut from one packed token stream."""

    def __init__(self, tokens: np.ndarray, domain_ids: np.ndarray, doc_start: np.ndarray, window: int) -> None:
        n = len(tokens) // window
        self.window = window
        self.tokens = tokens[: n * window].reshape(n, window)
        self.domain_ids = domain_ids[: n * window].reshape(n, window)
        self.doc_start = doc_start[: n * window].reshape(n, window)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = torch.from_numpy(self.tokens[i].astype(np.int64))
        return {
            "input_ids": w[:-1],
            "labels": w[1:],
            "domain_ids": torch.from_numpy(self.domain_ids[i, :-1].astype(np.int64)),
            "doc_start": torch.from_numpy(self.doc_start[i, :-1].copy()),
        }


class ResumableSampler(DistributedSampler):
    """Indices of a deterministic stream of per-epoch permutations, from stream position ``start`` to ``total``
    (``None``: endless, and then the sampler has no length).

    Position p of the stream is ``perm_e[p % n]`` with ``e = p // n`` and ``perm_e`` a permutation of the n
    items seeded by ``(seed, e)``. With ``world_size`` ranks, rank r reads positions ``start + r, start + r + W,
    ...`` so one optimizer step of all ranks consumes a contiguous block of the stream. It subclasses
    ``DistributedSampler`` only so that Lightning does not wrap it again under DDP; ``set_epoch`` is a no-op
    (the epoch is part of the stream position).

    Training uses the endless form: a loader without a length is one Lightning "epoch" that only ``max_steps``
    ends, so Lightning's restored batch counters can never cut it short or start it over on resume (with a
    length, a run resumed before its halfway point ended that "epoch" early and replayed batches).
    """

    def __init__(
        self, num_items: int, total: int | None, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:  # no super().__init__: it needs torch.distributed initialised
        if num_items <= 0:
            raise ValueError("ResumableSampler needs at least one item")
        self.num_items, self.total, self.seed, self.start = num_items, total, seed, start
        self.rank, self.num_replicas, self.epoch, self.shuffle, self.drop_last = rank, world_size, 0, True, False
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_items))
        return self._perm[1]

    def _positions(self) -> Iterator[int]:
        first = self.start + self.rank
        return itertools.count(first, self.num_replicas) if self.total is None else iter(
            range(first, self.total, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        for p in self._positions():
            e, i = divmod(p, self.num_items)
            yield int(self.permutation(e)[i])

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("an endless ResumableSampler has no length")  # Lightning reads: an unsized loader
        return len(range(self.start + self.rank, self.total, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        pass


def pins_memory(setting: bool | str, trainer: Any) -> bool:
    """Whether the data loaders put their batches in pinned (page-locked) host memory: ``setting`` True or False,
    or ``"auto"``: when ``trainer`` trains on a CUDA device. Why: a copy to the GPU from pageable memory synchronises
    with the stream before it starts (CUDA runtime API, "API synchronization behavior"), so Lightning's
    ``non_blocking=True`` batch transfer overlaps the GPU's work only from pinned memory."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"data.pin_memory={setting!r}: set auto (pinned batches when training on a GPU), true or "
                         f"false")
    device = getattr(getattr(trainer, "strategy", None), "root_device", None)
    return isinstance(device, torch.device) and device.type == "cuda"


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


class CorpusDataModule(pl.LightningDataModule):
    """The embedded multi-domain corpus built by ``moe-data`` (``DATA_ROOT/corpus``).

    Args:
        corpus_dir: a ``DatasetDict`` saved with ``save_to_disk`` with ``train``/``validation`` splits and columns
            ``text`` and ``domain``.
        tokenizer: ``"mixtral"``, ``"bpe:<N>"`` or a path to a ``tokenizer.json`` (see ``load_tokenizer``).
        seq_len: S, tokens per training sequence (windows hold S + 1 tokens).
        batch_size: B, sequences per batch (per device).
        domains: a subset of the corpus domains (default: all).
        val_sequences_per_domain: windows per domain in each validation loader.
        seed: seeds the training order (the windows themselves do not depend on it).
        num_workers: DataLoader workers.
        max_train_tokens: use only the first ``max_train_tokens // (S + 1)`` packed training windows.
        pin_memory: ``"auto"`` (pin the batches when the trainer trains on a CUDA device), True or False: see
            :func:`pins_memory`.
    """

    def __init__(
        self,
        corpus_dir: str | os.PathLike[str] | None = None,
        tokenizer: str = "mixtral",
        seq_len: int = 256,
        batch_size: int = 8,
        domains: Sequence[str] | str | None = None,
        val_sequences_per_domain: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        max_train_tokens: int | None = None,
        pin_memory: bool | str = "auto",
    ) -> None:
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got seq_len={seq_len}, batch_size={batch_size}")
        pins_memory(pin_memory, None)  # a bad value fails here, before any data is read
        self.pin_memory = pin_memory
        self.corpus_dir = _resolve(corpus_dir) if corpus_dir is not None else paths.corpus_dir()
        self.tokenizer_name = str(tokenizer)
        self.seq_len, self.batch_size, self.seed, self.num_workers = seq_len, batch_size, seed, num_workers
        self.val_sequences_per_domain = val_sequences_per_domain
        self.max_train_tokens = max_train_tokens
        if isinstance(domains, str):
            domains = [d.strip() for d in domains.split(",") if d.strip()]
        self.requested_domains = sorted(domains) if domains else None
        self.train_windows: PackedWindows | None = None
        self.val_windows: list[PackedWindows] = []
        self.resume_position: int | None = None  # training stream position loaded from a checkpoint

    # ------------------------------------------------------------ raw data (overridden by TextFilesDataModule)

    def load_raw(self):  # -> datasets.DatasetDict
        """The ``train``/``validation`` splits with ``text`` and ``domain`` columns."""
        import datasets

        if not (self.corpus_dir / "dataset_dict.json").is_file():
            raise ValueError(
                f"corpus not found at {self.corpus_dir}: run `moe-data` first (or `scripts/setup.sh`), or point "
                f"corpus_dir / $MOE_DATA_ROOT at a built corpus"
            )
        try:
            dd = datasets.load_from_disk(str(self.corpus_dir))
        except Exception as e:  # datasets cannot even load a split saved with zero rows
            for split in ("train", "validation"):
                if _arrow_rows(self.corpus_dir / split) == 0:
                    raise ValueError(
                        f"the {split!r} split of {self.corpus_dir} is empty: rebuild the corpus with `moe-data --force`"
                    ) from e
            raise ValueError(
                f"could not load the corpus at {self.corpus_dir} ({type(e).__name__}: {e}): rebuild "
                "it with `moe-data --force`"
            ) from e
        missing = [s for s in ("train", "validation") if s not in dd]
        if missing:
            raise ValueError(
                f"corpus at {self.corpus_dir} has no {missing} split(s); rebuild it with `moe-data --force`"
            )
        return dd

    @cached_property
    def raw(self):  # -> datasets.DatasetDict
        dd = self.load_raw()
        for split, ds in dd.items():
            if len(ds) == 0:
                raise ValueError(f"the {split!r} split of {self.source_name} is empty: rebuild or add data")
            for col in ("text", "domain"):
                if col not in ds.column_names:
                    raise ValueError(
                        f"the {split!r} split of {self.source_name} has no {col!r} column (columns: {ds.column_names})"
                    )
        return dd

    @property
    def source_name(self) -> str:
        return str(self.corpus_dir)

    # ------------------------------------------------------------ public attributes

    @cached_property
    def tokenizer(self):  # -> tokenizers.Tokenizer
        corpus = self.corpus_dir if self.tokenizer_name.startswith("bpe:") else None
        return load_tokenizer(self.tokenizer_name, corpus_dir=corpus)

    @cached_property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @cached_property
    def vocab_pieces(self) -> list[str]:
        """Every id's piece in SentencePiece notation (routers read word spans from it)."""
        return vocab_pieces(self.tokenizer)

    @cached_property
    def special_token_ids(self) -> list[int]:
        return special_token_ids(self.tokenizer)

    @cached_property
    def tokenizer_fingerprint(self) -> str:
        """sha256 of the tokenizer JSON (ties checkpoints and routing vocabularies to the tokenizer)."""
        return tokenizer_fingerprint(self.tokenizer)

    @cached_property
    def data_fingerprint(self) -> str:
        """Identifies the training tokens: tokenizer, corpus content, domains, seq_len, max_train_tokens.

        Use it (rather than ``tokenizer_fingerprint``) to key caches of statistics over the training split.
        """
        parts = [
            self.tokenizer_fingerprint,
            self.content_key(),
            ",".join(self.domains),
            str(self.seq_len),
            str(self.max_train_tokens),
            str(PACK_SEED),
        ]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def content_key(self) -> str:
        """Identifies the raw corpus: the manifest's ``corpus_sha256``, else the saved splits' fingerprints."""
        manifest = self.corpus_dir / "manifest.json"
        if manifest.is_file():
            key = json.loads(manifest.read_text()).get("corpus_sha256")
            if key:
                return str(key)
        return "+".join(self.raw[s]._fingerprint for s in sorted(self.raw))

    @cached_property
    def domains(self) -> list[str]:
        available = sorted(set().union(*(set(ds.unique("domain")) for ds in self.raw.values())))
        if self.requested_domains is None:
            return available
        unknown = [d for d in self.requested_domains if d not in available]
        if unknown:
            raise ValueError(f"domain(s) {unknown} not in {self.source_name}; available: {', '.join(available)}")
        return list(self.requested_domains)

    # ------------------------------------------------------------ tokenise and pack

    def _tokenized(self, split: str):  # -> datasets.Dataset with columns ids, domain
        ds = self.raw[split]
        if self.requested_domains is not None:
            keep = set(self.domains)
            ds = ds.select([i for i, d in enumerate(ds["domain"]) if d in keep])
        tok, bos = self.tokenizer, bos_id(self.tokenizer)

        def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            encs = tok.encode_batch([t or "" for t in batch["text"]], add_special_tokens=False)
            return {"ids": [np.asarray([bos, *e.ids], dtype=np.int32) for e in encs]}

        drop = [c for c in ds.column_names if c not in ("domain",)]
        return ds.map(
            encode,
            batched=True,
            batch_size=256,
            remove_columns=drop,
            desc=f"tokenizing {split}",
            new_fingerprint=_sha(ds._fingerprint, self.tokenizer_fingerprint, _TOKENIZE_VERSION),
        )

    def _pack(self, ds, order: np.ndarray | None, what: str) -> PackedWindows:
        import pyarrow as pa

        col = ds.with_format("arrow")[:]["ids"]
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if len(arr) == 0:
            raise ValueError(f"{what} of {self.source_name} has no documents")
        offsets = arr.offsets.to_numpy()
        offsets = offsets - offsets[0]
        values = arr.flatten().to_numpy(zero_copy_only=False)
        lengths = np.diff(offsets)
        dom_index = {d: i for i, d in enumerate(self.domains)}
        doc_dom = np.asarray([dom_index[d] for d in ds["domain"]], dtype=np.int64)
        if order is None:
            order = np.arange(len(lengths))
        tokens = np.concatenate([values[offsets[i] : offsets[i + 1]] for i in order])
        lens = lengths[order]
        if int(lens.sum()) <= len(lens):  # only the BOS of every document
            raise ValueError(f"{what} of {self.source_name} has no tokens (all documents are empty): add text")
        domain_ids = np.repeat(doc_dom[order].astype(np.int16), lens)
        doc_start = np.zeros(len(tokens), dtype=bool)
        doc_start[np.cumsum(lens) - lens] = True
        L = self.seq_len + 1
        if len(tokens) < L:
            raise ValueError(
                f"{what} of {self.source_name} has {len(tokens)} tokens, fewer than one window of "
                f"seq_len + 1 = {L}: lower seq_len or add data"
            )
        return PackedWindows(tokens, domain_ids, doc_start, L)

    def prepare_data(self) -> None:
        for split in ("train", "validation"):  # fills datasets' cache (once, on rank 0)
            self._tokenized(split)

    def setup(self, stage: str | None = None) -> None:
        if self.train_windows is not None:
            return
        train = self._tokenized("train")
        order = np.random.default_rng(PACK_SEED).permutation(len(train))
        windows = self._pack(train, order, "the train split")
        if self.max_train_tokens is not None:
            n = self.max_train_tokens // windows.window
            if n < 1:
                raise ValueError(
                    f"max_train_tokens={self.max_train_tokens} is less than one window of "
                    f"seq_len + 1 = {windows.window} tokens"
                )
            windows.tokens, windows.domain_ids, windows.doc_start = (
                a[:n] for a in (windows.tokens, windows.domain_ids, windows.doc_start)
            )
        self.train_windows = windows

        val = self._tokenized("validation")
        val_domains = np.asarray(val["domain"])
        self.val_windows = []
        for d in self.domains:
            idx = np.flatnonzero(val_domains == d)
            if len(idx) == 0:
                raise ValueError(
                    f"the validation split of {self.source_name} has no documents of domain {d!r}: "
                    "rebuild the corpus or drop the domain"
                )
            w = self._pack(val.select(idx), None, f"the validation split (domain {d!r})")
            k = min(len(w), self.val_sequences_per_domain)
            if k < self.val_sequences_per_domain:
                warnings.warn(
                    f"domain {d!r} has only {k} validation windows of {w.window} tokens "
                    f"(asked for {self.val_sequences_per_domain})",
                    stacklevel=2,
                )
            w.tokens, w.domain_ids, w.doc_start = w.tokens[:k], w.domain_ids[:k], w.doc_start[:k]
            self.val_windows.append(w)

    # ------------------------------------------------------------ loaders

    def train_token_chunks(self, windows_per_chunk: int = 4096) -> Iterator[torch.Tensor]:
        """Every training token once, as int64 (n, seq_len + 1) blocks of packed windows (for token statistics)."""
        if self.train_windows is None:
            self.setup("fit")
        assert self.train_windows is not None
        tokens = self.train_windows.tokens
        for i in range(0, len(tokens), windows_per_chunk):
            yield torch.from_numpy(tokens[i : i + windows_per_chunk].astype(np.int64))

    def train_sampler(self) -> ResumableSampler:
        """The training stream: endless under a trainer (it stops at ``max_steps``), from the position loaded from
        the checkpoint (:meth:`load_state_dict`) or, for a checkpoint without one, ``global_step`` steps in; one
        pass over the windows without a trainer."""
        assert self.train_windows is not None, "call setup() first"
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return ResumableSampler(len(self.train_windows), len(self.train_windows), seed=self.seed)
        if int(getattr(trainer, "max_steps", -1) or -1) <= 0:
            raise ValueError(f"{type(self).__name__} trains by steps: set trainer.max_steps (> 0)")
        start = self.resume_position
        if start is None:
            start = int(getattr(trainer, "global_step", 0) or 0) * self.samples_per_step()
        world, rank = int(getattr(trainer, "world_size", 1) or 1), int(getattr(trainer, "global_rank", 0) or 0)
        return ResumableSampler(len(self.train_windows), None, seed=self.seed, start=start, rank=rank, world_size=world)

    def samples_per_step(self) -> int:
        """Training windows one optimizer step reads over all ranks: batch_size x accumulate_grad_batches x world."""
        trainer = getattr(self, "trainer", None)
        accum = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        world = int(getattr(trainer, "world_size", 1) or 1)
        return self.batch_size * accum * world

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint (Lightning stores a data module's state): the training stream position, i.e.
        the windows read by the optimizer steps done so far (checkpoints are written after an optimizer step)."""
        trainer = getattr(self, "trainer", None)
        step = int(getattr(trainer, "global_step", 0) or 0)
        return {"train_position": step * self.samples_per_step(), "global_step": step,
                "samples_per_step": self.samples_per_step(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the training stream position (called by Lightning before the train loader is built)."""
        self.resume_position = int(state["train_position"])
        saved, now = state.get("samples_per_step"), self.samples_per_step()
        if saved is not None and saved != now:  # another world size (batch and accumulation are config checks)
            warnings.warn(
                f"resuming at training window {self.resume_position} with {now} windows per optimizer step (the "
                f"checkpoint's run read {saved}): the stream continues exactly, the global batch is not the same",
                stacklevel=2,
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_windows is None:
            self.setup("fit")
        return DataLoader(
            self.train_windows,
            batch_size=self.batch_size,
            sampler=self.train_sampler(),
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=pins_memory(self.pin_memory, self.trainer),
        )

    def val_dataloader(self) -> list[DataLoader]:
        if self.train_windows is None:
            self.setup("validate")
        return [
            DataLoader(
                w,
                batch_size=self.batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                pin_memory=pins_memory(self.pin_memory, self.trainer),
            )
            for w in self.val_windows
        ]


class TextFilesDataModule(CorpusDataModule):
    """Any local text/jsonl/json/csv/parquet files (or a ``datasets`` dataset by ``path``) as a multi-domain corpus.

    Args:
        data_files: a file, glob or list of them (split into train/validation per domain like the corpus), or a
            ``{"train": ..., "validation": ...}`` mapping.
        path: instead of files, a ``datasets.load_dataset`` path (a local dataset directory or builder name).
        text_column: the column holding the text (json/csv/parquet); ``.txt`` files are one document each,
            split at paragraph boundaries into ~4 KB documents.
        domain_column: the column holding the domain name; if absent, the file name (without extension) is used.
        validation_fraction: share of documents per domain held out when no validation files are given.
        **kwargs: as :class:`CorpusDataModule` (without ``corpus_dir``).
    """

    BUILDERS = {
        ".txt": "text",
        ".text": "text",
        ".md": "text",
        ".jsonl": "json",
        ".json": "json",
        ".csv": "csv",
        ".parquet": "parquet",
    }

    def __init__(
        self,
        data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
        path: str | None = None,
        text_column: str = "text",
        domain_column: str = "domain",
        validation_fraction: float = 0.05,
        **kwargs: Any,
    ) -> None:
        if (data_files is None) == (path is None):
            raise ValueError("give exactly one of data_files (local files) or path (a datasets dataset)")
        super().__init__(corpus_dir=kwargs.pop("corpus_dir", None), **kwargs)
        if isinstance(data_files, Mapping):
            self.data_files = {str(k): _as_list(v) for k, v in data_files.items()}
        else:
            self.data_files = {"all": _as_list(data_files)} if data_files is not None else {}
        self.path, self.text_column, self.domain_column = path, text_column, domain_column
        self.validation_fraction = validation_fraction

    @property
    def source_name(self) -> str:
        return self.path or ", ".join(f for fs in self.data_files.values() for f in fs)

    def load_raw(self):  # -> datasets.DatasetDict
        import datasets

        from moe_variants.data.build import split_documents, validation_flags

        if self.path is not None:
            loaded = datasets.load_dataset(self.path)
            parts = {s: self._normalise(ds, self.path) for s, ds in loaded.items()}
        else:
            parts = {}
            for split, patterns in self.data_files.items():
                rows = []
                for f in _expand(patterns):
                    builder = self.BUILDERS.get(f.suffix.lower())
                    if builder is None:
                        raise ValueError(f"{f}: unsupported file type {f.suffix!r} (use {sorted(self.BUILDERS)})")
                    _check_file(f, text=builder != "parquet")
                    kw = {"sample_by": "document"} if builder == "text" else {}
                    ds = datasets.load_dataset(builder, data_files=[str(f)], split="train", **kw)
                    rows.append(self._normalise(ds, f.stem))
                parts[split] = datasets.concatenate_datasets(rows)
        # long texts (a whole book in one .txt) become ~4 KB documents, like the corpus
        split_parts = {}
        for split, ds in parts.items():
            texts, doms = [], []
            for t, d in zip(ds["text"], ds["domain"]):
                for doc in split_documents(t or ""):
                    texts.append(doc)
                    doms.append(d)
            if not texts:
                raise ValueError(f"no text in the {split!r} files of {self.source_name}: the files are empty")
            split_parts[split] = (texts, doms)
        if set(split_parts) >= {"train", "validation"}:
            out = split_parts
        else:
            texts, doms = split_parts.get("all") or split_parts.get("train")  # type: ignore[misc]
            out = {"train": ([], []), "validation": ([], [])}
            for d in sorted(set(doms)):
                idx = [i for i, x in enumerate(doms) if x == d]
                flags = validation_flags([texts[i] for i in idx], self.validation_fraction)
                for i, v in zip(idx, flags):
                    out["validation" if v else "train"][0].append(texts[i])
                    out["validation" if v else "train"][1].append(d)
        h = hashlib.sha256()
        for split in sorted(out):
            for t, d in zip(*out[split]):
                h.update(f"{split}\x00{d}\x00{t}\x00".encode("utf-8", "surrogatepass"))
        self._content_key = h.hexdigest()
        return datasets.DatasetDict(
            {s: datasets.Dataset.from_dict({"text": t, "domain": d}) for s, (t, d) in out.items()}
        )

    def content_key(self) -> str:
        """A hash of the documents read from the files."""
        self.raw  # noqa: B018  (loads the files and sets _content_key)
        return self._content_key

    def _normalise(self, ds, default_domain: str):  # -> datasets.Dataset with text, domain
        if self.text_column not in ds.column_names:
            raise ValueError(
                f"{default_domain}: no text column {self.text_column!r} (columns: {ds.column_names}); set text_column"
            )
        if self.domain_column in ds.column_names:
            domains = [str(d) for d in ds[self.domain_column]]
        else:
            domains = [str(default_domain)] * len(ds)
        ds = ds.select_columns([self.text_column])
        if self.text_column != "text":
            ds = ds.rename_column(self.text_column, "text")
        return ds.add_column("domain", domains)


def _resolve(path: str | os.PathLike[str]) -> Path:
    """A relative path that does not exist from the working directory is taken relative to the repo root."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (paths.REPO_ROOT / p).exists():
        return paths.REPO_ROOT / p
    return p


def _as_list(v: Any) -> list[str]:
    return [str(v)] if isinstance(v, (str, os.PathLike)) else [str(x) for x in v]


def _expand(patterns: Sequence[str]) -> list[Path]:
    import glob

    files: list[Path] = []
    for p in patterns:
        matched = sorted(glob.glob(os.path.expanduser(p), recursive=True))
        if not matched:
            raise ValueError(f"no file matches {p!r}")
        files += [Path(m) for m in matched if Path(m).is_file()]
    return files


def _check_file(f: Path, text: bool) -> None:
    """Fail early and clearly on an empty file or (for text formats) bytes that are not UTF-8."""
    if f.stat().st_size == 0:
        raise ValueError(f"{f} is empty: remove it from data_files or add text")
    if not text:
        return
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    pos = 0  # bytes read so far; the decoder may hold back the start of a split multi-byte character
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 20):
            held = len(dec.getstate()[0])
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{f} is not valid UTF-8 at byte offset {pos - held + e.start} ({e.reason}): "
                    "re-encode it (e.g. `iconv -f latin1 -t utf-8`) or drop the file"
                ) from None
            pos += len(chunk)
        held = len(dec.getstate()[0])
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(
                f"{f} is not valid UTF-8 at byte offset {pos - held} (truncated character at the "
                "end): re-encode it or drop the file"
            ) from None


def _arrow_rows(split_dir: Path) -> int | None:
    """Rows in the arrow files of a split saved with ``save_to_disk`` (None if unreadable)."""
    import pyarrow as pa

    try:
        return sum(
            pa.ipc.open_stream(pa.memory_map(str(f))).read_all().num_rows
            for f in sorted(split_dir.glob("data-*.arrow"))
        )
    except (OSError, pa.ArrowException):
        return None
