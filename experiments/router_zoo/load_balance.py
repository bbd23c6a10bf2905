"""Expert load balance of a training run, from its CSV log (``logger=csv``, best with ``trainer.log_every_n_steps=1``)
or, without one, its offline W&B run.

For every MoE layer and step window it prints two numbers:

- ``per-step``: the mean over the window's logged steps of ``routing/layer{i}/max_over_mean``, the busiest expert's
  share of one batch's assignments over the mean share (1 = balanced);
- ``window``: the same ratio for the assignments summed over the window's logged steps (every batch has the same
  number of tokens, so the summed load is the mean of the logged shares). A router specialised by content shows
  batch-to-batch imbalance that a per-expert correction cannot remove; the summed load is what it balances.

and over all layers, the per-step worst layer (``max_i``) of each logged step: its mean over the window, its worst
step and the share of steps under ``--threshold``; and the worst layer's window ratio. ``--csv`` writes these rows.

Steps are those of the CSV log: Lightning writes the batch of optimizer step n (1-based) under step n - 1, so with
a 30-step LR warm-up, ``--windows 30-149`` is every batch after it (of a 150-step run).

    python experiments/router_zoo/load_balance.py runs/router_zoo/aux_free-s0,loss=no_aux --windows 30-149 100-149
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path

from moe_variants.training.wandb_offline import read_run


def read_loads(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the routing metrics logged at that step: from every ``metrics.csv`` under ``<run_dir>/csv``, else
    from the run's offline W&B history (``trainer/global_step``, the same step numbers as the CSV's)."""
    rows: dict[int, dict[str, float]] = {}
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if files:
        for path in files:
            with open(path) as f:
                for row in csv.DictReader(f):
                    values = {k: float(v) for k, v in row.items() if k.startswith("routing/") and v}
                    if values:
                        rows.setdefault(int(row["step"]), {}).update(values)
        return rows
    try:
        history = read_run(run_dir)["history"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv and no offline W&B run under {run_dir}: train with "
                                "logger=csv or logger=wandb") from None
    for item in history:
        values = {k: float(v) for k, v in item.items() if k.startswith("routing/") and isinstance(v, (int, float))}
        if values and "trainer/global_step" in item:
            rows.setdefault(int(item["trainer/global_step"]), {}).update(values)
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


def worst_layer_per_step(rows: dict[int, dict[str, float]], lo: int, hi: int) -> list[float]:
    """For every logged step in [lo, hi], max over layers of ``routing/layer{i}/max_over_mean``."""
    out = []
    for s in sorted(rows):
        ratios = [v for k, v in rows[s].items() if re.match(r"routing/layer\d+/max_over_mean$", k)]
        if lo <= s <= hi and ratios:
            out.append(max(ratios))
    if not out:
        raise ValueError(f"no step in [{lo}, {hi}] logged routing/layer<i>/max_over_mean")
    return out


def summary(rows: dict[int, dict[str, float]], lo: int, hi: int, threshold: float = 1.1) -> dict[str, float]:
    """Over all layers: the per-step worst layer's mean, worst and share under ``threshold`` over the window's
    logged steps, and the worst layer's ratio of the load summed over the window."""
    worst = worst_layer_per_step(rows, lo, hi)
    return {"logged_steps": len(worst), "per_step_mean": statistics.fmean(worst), "per_step_worst": max(worst),
            "per_step_share_under": sum(w < threshold for w in worst) / len(worst),
            "window": max(win for _, win in window_balance(rows, lo, hi))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run dirs (runs/<experiment>/<name>)")
    p.add_argument("--windows", nargs="+", default=["30-149", "100-149"], help="step ranges lo-hi (logged steps)")
    p.add_argument("--threshold", type=float, default=1.1, help="per-step ratio counted as balanced (default 1.1)")
    p.add_argument("--csv", type=Path, help="also write one row per run and window to this file (with the run's "
                   "validation loss from its report.json)")
    a = p.parse_args(argv)
    table = []
    for run in a.runs:
        rows = read_loads(run)
        for w in a.windows:
            lo, hi = map(int, w.split("-"))
            per_layer = window_balance(rows, lo, hi)
            cells = "  ".join(f"L{i} {ps:.2f} / {win:.2f}" for i, (ps, win) in enumerate(per_layer))
            print(f"{run.name:24s} steps {w:>8s}  per-step / window max_over_mean: {cells}")
            s = summary(rows, lo, hi, a.threshold)
            print(f"{'':24s} {'':14s}  all layers: per-step worst layer mean {s['per_step_mean']:.3f}, worst step "
                  f"{s['per_step_worst']:.3f}, {s['per_step_share_under']:.0%} of {s['logged_steps']} steps under "
                  f"{a.threshold:g}; window, worst layer {s['window']:.3f}")
            report = run / "report.json"  # written by moe-train at the end of a run: its validation loss
            val_loss = round(json.loads(report.read_text())["val_loss"], 4) if report.exists() else None
            table.append({"run": run.name, "window_steps": w, "val_loss": val_loss,
                          **{k: round(v, 4) for k, v in s.items()},
                          **{f"layer{i}_per_step": round(ps, 4) for i, (ps, _) in enumerate(per_layer)},
                          **{f"layer{i}_window": round(win, 4) for i, (_, win) in enumerate(per_layer)}})
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)


if __name__ == "__main__":
    main()
