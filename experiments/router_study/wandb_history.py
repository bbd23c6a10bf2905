"""Read logged metrics back from a run's offline W&B files, with no server and no network.

The ``.wandb`` files are read with W&B's own reader (``moe_variants.training.wandb_offline``: ``wandb leet inspect
--json``), which checks every record's length and checksum and never returns a partially written record.

    read_history(Path("runs/router_study/topk-s0"))  # {"train/loss": [(19, 7.19), ...], "val/loss": [...], ...}
"""

from __future__ import annotations

from pathlib import Path

from moe_variants.training.wandb_offline import read_file, run_files

STEP_KEY = "trainer/global_step"  # Lightning's step, logged with every row


def read_history(
    run_dir: Path, keys: tuple[str, ...] = ("train/loss", "val/loss"), wait_s: float = 0.0
) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` over every offline W&B folder of a run (one per start or resume; a later
    folder's value wins for the same step). Empty when the run has no offline W&B files. ``wait_s``: how long to
    wait for each folder's exit record (a file read right after ``wandb.finish()`` may not be complete yet)."""
    series: dict[str, dict[int, float]] = {k: {} for k in keys}
    for path in run_files(run_dir):  # in the order they ended
        for row in read_file(path, wait_s)["history"]:
            step = row.get(STEP_KEY)
            for k in keys:
                if k in row and step is not None:
                    series[k][int(step)] = float(row[k])
    return {k: sorted(v.items()) for k, v in series.items() if v}
