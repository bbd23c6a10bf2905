"""Checkpoint IO: atomic writes, reading a checkpoint and its saved run config back, comparing configs.

A training checkpoint is Lightning's dict plus the resolved run config under ``CONFIG_KEY``; the model
weights (router tables and the word-start table included: they are buffers) are ``state_dict["model.*"]``.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

CONFIG_KEY = "moe_variants_config"  # where the resolved run config lives in a checkpoint
MODEL_SECTIONS = ("model", "router", "experts")  # what must match for weights to mean the same thing


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: a crash or an exception
    mid-write leaves either the old file or the new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0o600; a checkpoint gets what open() would give
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with atomic, fsynced writes (see :func:`save_atomic`); ``seconds`` is the
    time spent writing so far (the run report's checkpointing time)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        start = time.perf_counter()
        save_atomic(checkpoint, path)
        self.seconds += time.perf_counter() - start


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a moe-variants training checkpoint dict, or raise ``ValueError`` saying what the file is not."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / "last.ckpt"
        if not candidate.is_file():
            raise ValueError(f"{path} is a folder without checkpoints/last.ckpt: pass a .ckpt file or a run dir")
        path = candidate
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        # our own files only; Lightning checkpoints hold non-tensor objects, so not weights_only
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a checkpoint (torch.load failed: {type(e).__name__}: {e})") from e
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is a torch file but not a Lightning training checkpoint (no 'state_dict')")
    if CONFIG_KEY not in ckpt:
        raise ValueError(
            f"{path} is a Lightning checkpoint without a saved moe-variants config ({CONFIG_KEY!r}): it was not "
            f"written by moe-train, so the model cannot be rebuilt from it"
        )
    return dict(ckpt)


def checkpoint_config(path: str | os.PathLike[str]) -> DictConfig:
    """The resolved run config saved in a checkpoint."""
    return OmegaConf.create(read_checkpoint(path)[CONFIG_KEY])


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], sections=MODEL_SECTIONS) -> list[str]:
    """``["model.dim: checkpoint 64, config 128", ...]`` over the sections that define the weights."""
    diffs = []
    for section in sections:
        a = _flatten({section: saved.get(section)})
        b = _flatten({section: current.get(section)})
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<missing>") != b.get(key, "<missing>"):
                diffs.append(f"{key}: checkpoint {a.get(key, '<missing>')!r}, config {b.get(key, '<missing>')!r}")
    return diffs
