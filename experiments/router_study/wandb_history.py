"""Read logged metrics back from a run's offline W&B files, with no server and no network.

The ``wandb`` package (0.2x-0.3x) reads offline runs only by syncing them to a server, so this reads the file
itself: ``run-<id>.wandb`` is a LevelDB-style log (a 7-byte file header, then 32 KiB blocks of records, each with a
7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST) whose records are ``wandb_internal_pb2.Record``
protobufs; history rows are the ``history`` records. Checksums are not verified.

    read_history(Path("runs/router_study/topk-s0"))  # {"train/loss": [(19, 7.19), ...], "val/loss": [...], ...}
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7  # bytes: the file's (":W&B", magic, version) and each record's (crc32c, length, type)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
STEP_KEY = "trainer/global_step"  # Lightning's step, logged with every row


def _records(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (no ':W&B' header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # a block's tail too short for a record header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += (BLOCK - pos % BLOCK) % BLOCK
            continue
        chunk, pos = data[pos : pos + length], pos + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def history_rows(path: Path) -> list[dict[str, object]]:
    """Every history row of one ``.wandb`` file, as {key: value}."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in _records(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def read_history(
    run_dir: Path, keys: tuple[str, ...] = ("train/loss", "val/loss")
) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` over every offline W&B folder of a run (one per start or resume; a later
    folder's value wins for the same step). Empty when the run has no offline W&B files."""
    series: dict[str, dict[int, float]] = {k: {} for k in keys}
    parts = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    for path in parts:  # in the order they ended (folder names order by start second only)
        for row in history_rows(path):
            step = row.get(STEP_KEY)
            for k in keys:
                if k in row and step is not None:
                    series[k][int(step)] = float(row[k])
    return {k: sorted(v.items()) for k, v in series.items() if v}
