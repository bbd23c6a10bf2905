"""Tokens/s of ``moe-train`` runs on this machine, for a study's compute plan: each probe is a short real run
(the study's data, precision and compile settings), ``--parallel`` of them at once on one GPU; the steady-state
tokens/s comes from each run's report.json (median of the logged windows after the first: compile and warm-up
are left out).

    python experiments/router_study/probe_throughput.py --out results/router_study_v2/throughput.csv \\
        --probe small:model=small --probe small-hash:model=small,router=hash --parallel 1 --parallel 3 \\
        -- data=large data.allow_partial=true trainer=gpu experts=grouped compile=true

A probe is ``NAME:OVERRIDES`` (comma-separated moe-train overrides; ``router=...`` too). Every probe runs once per
``--parallel`` value, as that many identical runs at once (seeds 0..n-1); the CSV row holds the per-run and the
summed tokens/s. Runs go to ``runs/<--experiment>/``; their checkpoints are deleted afterwards.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def probe_runs(name: str, overrides: list[str], n: int, common: list[str], experiment: str,
               steps: int) -> dict[str, object]:
    """Start ``n`` identical runs (seeds 0..n-1) at once and wait; their tokens/s from report.json."""
    procs, dirs = [], []
    for seed in range(n):
        run = f"{name}-p{n}-s{seed}"
        d = Path("runs") / experiment / run
        shutil.rmtree(d, ignore_errors=True)
        cmd = [sys.executable, "-m", "moe_variants.training.run", *common, *overrides, f"seed={seed}",
               f"experiment={experiment}", f"name={run}", f"trainer.max_steps={steps}",
               f"trainer.val_check_interval={steps}", "data.val_sequences_per_domain=4"]
        log = open(Path("runs") / experiment / f"{run}.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        dirs.append(d)
    t0 = time.monotonic()
    for p, log in procs:
        p.wait()
        log.close()
    wall = time.monotonic() - t0
    per_run = []
    for d, (p, _) in zip(dirs, procs):
        rep = d / "report.json"
        per_run.append(json.loads(rep.read_text()).get("tokens_per_s") if p.returncode == 0 and rep.is_file()
                       else None)
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
    ok = [x for x in per_run if x]
    return {"probe": name, "overrides": " ".join(overrides), "parallel": n, "steps": steps,
            "tokens_per_s_per_run": round(statistics.mean(ok)) if ok else None,
            "tokens_per_s_total": round(sum(ok)) if len(ok) == n else None,
            "failed": n - len(ok), "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probe", action="append", required=True, help="NAME:OVERRIDES (comma-separated)")
    p.add_argument("--parallel", action="append", type=int, help="runs at once (repeatable; default 1)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--experiment", default="throughput_probe")
    p.add_argument("--out", type=Path, required=True, help="CSV, appended to as each probe finishes")
    p.add_argument("common", nargs="*", help="moe-train overrides for every probe (after --)")
    a = p.parse_args(argv)
    (Path("runs") / a.experiment).mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["probe", "overrides", "parallel", "steps", "tokens_per_s_per_run", "tokens_per_s_total", "failed",
              "wall_s"]
    new = not a.out.is_file()
    for spec in a.probe:
        name, _, ov = spec.partition(":")
        for n in a.parallel or [1]:
            row = probe_runs(name, [o for o in ov.split(",") if o], n, a.common, a.experiment, a.steps)
            print(row, flush=True)
            with a.out.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                if new:
                    w.writeheader()
                    new = False
                w.writerow(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
