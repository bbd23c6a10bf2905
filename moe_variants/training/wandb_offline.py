"""Read offline W&B runs back, with no server and no network, through W&B's own reader.

``wandb leet inspect --json FILE`` (wandb >= 0.2x ships it; it runs wandb-core's transaction-log reader) prints
every record of a ``run-<id>.wandb`` file as one JSON line. Unlike a hand-written parser of the LevelDB-style log,
it checks each record's length and CRC, and it never returns a record that wandb-core has not finished writing:
``wandb.finish()`` returns before wandb-core has flushed the last records (the run's exit record among them), so a
file read right after it can end in a partial record. :func:`read_run` therefore waits, up to ``wait_s``, for the
exit record.

    read_run(Path("runs/default/topk-s0"), wait_s=30)  # {"group", "tags", "config", "history": [rows], "exit_code"}
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}  # how the JSON encodes them


def records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of one ``.wandb`` file, in order, as ``{"type": "history", "history": {...}, ...}``
    (the protobuf ``Record`` in JSON: fields left at their default, such as a zero exit code, are absent)."""
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"`wandb leet inspect --json {path}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _value(v: Any) -> Any:
    return _NON_FINITE.get(v, v) if isinstance(v, str) else v


def run_files(run_dir: str | Path) -> list[Path]:
    """The ``.wandb`` files of a run dir's offline sittings, in the order they were written (a resumed run has one
    per sitting; folder names order by start second only)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)


def read_file(path: str | Path, wait_s: float = 0.0) -> dict[str, Any]:
    """One sitting: ``group``, ``tags``, ``config`` (as logged), ``history`` (rows of ``{key: value}``; nested
    keys joined with ``.``), ``exit_code`` (None while the file has no exit record: the run is still being written,
    or it was killed). Waits up to ``wait_s`` seconds for the exit record (use it right after ``wandb.finish()``)."""
    deadline = time.monotonic() + wait_s
    while True:
        out = _parse(records(path))
        if out["exit_code"] is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.5)


def _parse(recs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"group": None, "tags": [], "config": {}, "history": [], "exit_code": None}
    for rec in recs:
        kind = rec.get("type")
        if kind == "run":
            run = rec["run"]
            out["group"], out["tags"] = run.get("run_group"), list(run.get("tags", []))
            out["config"].update(run.get("config", {}).get("update", {}))
        elif kind == "config":
            out["config"].update(rec["config"].get("update", {}))
        elif kind == "history":
            out["history"].append({k: _value(v) for k, v in rec["history"].get("item", {}).items()})
        elif kind == "exit":
            out["exit_code"] = int(rec["exit"].get("exit_code", 0))
    out["config"].pop("_wandb", None)
    return out


def read_run(run_dir: str | Path, wait_s: float = 0.0) -> dict[str, Any]:
    """The last sitting of a run dir (see :func:`read_file`). Raises ``FileNotFoundError`` if the run dir has no
    offline W&B run."""
    files = run_files(run_dir)
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {run_dir} (wandb/offline-run-*/run-*.wandb)")
    return read_file(files[-1], wait_s)
