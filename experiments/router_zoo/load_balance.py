"""Expert load balance of a training run, from its CSV log (``logger=csv``, best with ``trainer.log_every_n_steps=1``).

For every MoE layer and step window it prints two numbers:

- ``per-step``: the mean over the window's logged steps of ``routing/layer{i}/max_over_mean``, the busiest expert's
  share of one batch's assignments over the mean share (1 = balanced);
- ``window``: the same ratio for the assignments summed over the window's logged steps (every batch has the same
  number of tokens, so the summed load is the mean of the logged shares). A router specialised by content shows
  batch-to-batch imbalance that a per-expert correction cannot remove; the summed load is what it balances.

    python experiments/router_zoo/load_balance.py runs/router_zoo/final_aux_free --windows 31-150 101-150
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path


def read_loads(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the routing metrics logged at that step (every ``metrics.csv`` under ``<run_dir>/csv``)."""
    rows: dict[int, dict[str, float]] = {}
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv under {run_dir}: train with logger=csv")
    for path in files:
        with open(path) as f:
            for row in csv.DictReader(f):
                values = {k: float(v) for k, v in row.items() if k.startswith("routing/") and v}
                if values:
                    rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def window_balance(rows: dict[int, dict[str, float]], lo: int, hi: int) -> list[tuple[float, float]]:
    """Per layer (mean per-step max/mean, max/mean of the summed load) over the logged steps in [lo, hi]."""
    steps = [s for s in sorted(rows) if lo <= s <= hi and "routing/layer0/load/e0" in rows[s]]
    if not steps:
        raise ValueError(f"no step in [{lo}, {hi}] logged per-expert loads (routing/layer0/load/e0)")
    layers = sorted({int(m[1]) for k in rows[steps[0]] if (m := re.match(r"routing/layer(\d+)/load/e0$", k))})
    experts = len([k for k in rows[steps[0]] if re.match(r"routing/layer0/load/e\d+$", k)])
    out = []
    for i in layers:
        per_step = sum(rows[s][f"routing/layer{i}/max_over_mean"] for s in steps) / len(steps)
        summed = [sum(rows[s][f"routing/layer{i}/load/e{j}"] for s in steps) / len(steps) for j in range(experts)]
        out.append((per_step, max(summed) * experts))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run dirs (runs/<experiment>/<name>)")
    p.add_argument("--windows", nargs="+", default=["31-150", "101-150"], help="step ranges lo-hi (logged steps)")
    a = p.parse_args(argv)
    for run in a.runs:
        rows = read_loads(run)
        for w in a.windows:
            lo, hi = map(int, w.split("-"))
            per_layer = window_balance(rows, lo, hi)
            cells = "  ".join(f"L{i} {ps:.2f} / {win:.2f}" for i, (ps, win) in enumerate(per_layer))
            print(f"{run.name:24s} steps {w:>8s}  per-step / window max_over_mean: {cells}")


if __name__ == "__main__":
    main()
