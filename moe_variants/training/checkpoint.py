"""Checkpoint IO: atomic writes of finite checkpoints only, reading a checkpoint and its saved run config back,
comparing configs.

A training checkpoint is Lightning's dict plus the resolved run config under ``CONFIG_KEY``; the model
weights (router tables and the word-start table included: they are buffers) are ``state_dict["model.*"]``.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

CONFIG_KEY = "moe_variants_config"  # where the resolved run config lives in a checkpoint
MODEL_SECTIONS = ("model", "router", "experts")  # what must match for weights to mean the same thing
# what else defines what a resumed run trains (dotted keys: a section or one value); the stop step
# (trainer.max_steps) is not among them: the LR schedule's horizon is scheduler.total_steps
TRAINING_KEYS = ("optimizer", "router_lr_scale", "load_balance_scope", "scheduler", "loss", "data", "seed",
                 "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm",
                 "trainer.precision")
# top-level training keys added after checkpoints were written, with the value those checkpoints trained with
ADDED_KEYS = {"router_lr_scale": 1.0, "load_balance_scope": "local"}
# num_workers and pin_memory change how fast, not what, a run trains; batch_size is per process: a resume may move
# to another number of processes with the same global batch, which training.build.check_global_batch compares instead
NOT_COMPARED = ("data.num_workers", "data.pin_memory", "data.batch_size")
TEMP_GLOB = ".*.tmp"  # save_atomic's temp files: .<name>.<random>.tmp


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def write_error(e: OSError, path: Path, what: str) -> OSError:
    """A one-line ``OSError`` naming ``path`` and the fix, for the errors a researcher can act on (full disk or
    quota, read-only or not-writable folder); other errors are returned unchanged."""
    if e.errno in NO_SPACE:
        return OSError(e.errno, f"no space left to write {what} {path} ({e.strerror}): free space on that disk (what "
                                f"was written before is kept), or move the run (experiment=/name=/hydra.run.dir=)")
    if e.errno in NOT_WRITABLE:
        return OSError(e.errno, f"cannot write {what} {path} ({e.strerror}): make {path.parent} writable, or run "
                                f"elsewhere (experiment=/name=/hydra.run.dir=)")
    return e


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: a crash or an exception
    mid-write leaves either the old file or the new one, never a partial file (a killed process leaves a temp
    file, ``.<name>.<random>.tmp``, which :func:`remove_temp_files` clears at the run's next start). A full disk or
    a read-only folder raises a one-line ``OSError`` naming the path (see :func:`write_error`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(e, path, "checkpoint") from None
    f = _WriteErrors(os.fdopen(fd, "wb"))
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0o600; a checkpoint gets what open() would give
        with f.file:
            torch.save(obj, f)
            f.file.flush()
            os.fsync(f.file.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = f.error or e  # torch.save reports a failed write as a RuntimeError ("unexpected pos")
        if isinstance(cause, OSError) and write_error(cause, path, "checkpoint") is not cause:
            raise write_error(cause, path, "checkpoint") from None
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


class _WriteErrors:
    """A binary file for ``torch.save`` that keeps the ``OSError`` of a failed write (a full disk): torch's zip
    writer turns it into a ``RuntimeError`` that no longer says why."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def remove_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files that processes killed inside :func:`save_atomic` left in ``folder``; returns them.
    Call it only while owning the folder (no live writer)."""
    folder = Path(folder)
    stale = sorted(folder.glob(TEMP_GLOB)) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an inf. One device sync per device and dtype group:
    the max-abs norm of every tensor in one fused call (it propagates NaN and, unlike a 2-norm, cannot overflow)."""
    named = [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0]
    if not named:
        return []
    norms = torch._foreach_norm([t.detach() for _, t in named], ord=float("inf"))
    by_device: dict[torch.device, list[int]] = {}
    for i, x in enumerate(norms):
        by_device.setdefault(x.device, []).append(i)
    bad: list[int] = []
    for idx in by_device.values():
        finite = torch.isfinite(torch.stack([norms[i].float() for i in idx])).tolist()
        bad += [i for i, good in zip(idx, finite, strict=True) if not good]
    return [named[i][0] for i in sorted(bad)]


def checkpoint_nonfinite(checkpoint: Mapping[str, Any]) -> list[str]:
    """Non-finite tensors of a training checkpoint's weights and optimizer state."""
    return nonfinite(_tensors({"state_dict": checkpoint.get("state_dict", {}),
                               "optimizer_states": checkpoint.get("optimizer_states", [])}))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with atomic, fsynced writes (see :func:`save_atomic`) that refuses to write
    a checkpoint holding NaN/inf weights or optimizer state: the checkpoints already written stay the last good
    ones. ``seconds`` is the time spent writing so far (the run report's checkpointing time)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        bad = checkpoint_nonfinite(checkpoint)
        if bad:
            raise FloatingPointError(
                f"refusing to write checkpoint {path} at step {checkpoint.get('global_step')}: non-finite values in "
                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the checkpoints written before are kept. "
                f"Lower the LR (optimizer.lr) and resume from the last one (ckpt_path=last "
                f"resume_allow_changes=[optimizer.lr] optimizer.lr=...)"
            )
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


def _select(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, Mapping) else None
    return d


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str] = MODEL_SECTIONS,
                ignore: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """``{"model.dim": (checkpoint value, config value), ...}`` for the leaves under ``keys`` (sections or dotted
    keys) that differ; ``"<missing>"`` where one side lacks the key."""
    ignore = tuple(ignore)
    diffs: dict[str, tuple[Any, Any]] = {}
    for key in keys:
        a, b = _flatten({key: _select(saved, key)}), _flatten({key: _select(current, key)})
        for leaf in sorted(set(a) | set(b)):
            if any(leaf == i or leaf.startswith(i + ".") for i in ignore):
                continue
            if a.get(leaf, "<missing>") != b.get(leaf, "<missing>"):
                diffs[leaf] = (a.get(leaf, "<missing>"), b.get(leaf, "<missing>"))
    return diffs

