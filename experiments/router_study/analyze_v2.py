"""Router study v2 report, from the saved runs alone (each run's report.json and .hydra config; no checkpoints):
``results/<study>/`` gets

- ``summary.csv``: one row per grid run (arm, budget, budget_tokens, seed, val_loss, per-domain val loss,
  tokens_per_s, steps, wall and training seconds, final routing churn, lr, run dir),
- ``tuning.csv``: one row per tuning run, the chosen one per arm marked (as ``sweep_v2.py choose`` writes it),
- ``report.md``: per budget, each arm's paired per-seed difference to topk (mean, 95% Student-t interval over
  seeds, n), the tuning table, and what is missing,
- ``gap_vs_tokens.png``: that difference against the training tokens (log x, 95% intervals as error bars).

    python experiments/router_study/analyze_v2.py         # runs/router_study_v2 -> results/router_study_v2
    python experiments/router_study/analyze_v2.py --study router_study_v2_smoke --budgets tiny --tune-budget tiny

Paired: the seed sets the init, the data order and the hash table of every arm alike, so arm and topk of one seed
form a pair; the interval is over the per-seed differences d_s = val_loss(arm, s) - val_loss(topk, s):
mean(d) ± t(0.975, n-1) * sd(d) / sqrt(n). With n = 1 there is no interval; with n = 3 it is wide (t = 4.30).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mpmath  # Student's t quantile (regularised incomplete beta); installed with torch (via sympy)
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import STUDY_CONF_DIR, study_root  # noqa: E402
from sweep_v2 import ARMS, BUDGETS, GRID_DIR, REFERENCE, read_report, tuning_rows, write_tuning_csv  # noqa: E402


# -- statistics ---------------------------------------------------------------------------------------------------
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with ``df`` degrees of freedom: solves CDF(t) = p, where
    1 - CDF(t) = I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 for t > 0."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    tail = lambda t: mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True) / 2 - (1 - p)  # noqa: E731
    lo, hi = mpmath.mpf(0), mpmath.mpf(1)
    while tail(hi) > 0:  # the tail shrinks as t grows: bracket the root, then bisect
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) > 0 else (lo, mid)
    return float((lo + hi) / 2)


@dataclass
class Paired:
    """Paired differences a_s - b_s over the seeds both have: n, mean, sample sd, and the two-sided interval."""

    seeds: list[int]
    diffs: list[float]
    level: float = 0.95

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs) if self.diffs else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.diffs) if self.n >= 2 else math.nan

    @property
    def half_width(self) -> float:
        if self.n < 2:
            return math.nan
        return t_quantile(1 - (1 - self.level) / 2, self.n - 1) * self.sd / math.sqrt(self.n)

    @property
    def ci(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    def verdict(self) -> str:
        if self.n < 2:
            return f"no interval (n={self.n})"
        lo, hi = self.ci
        if lo > 0:
            return "higher loss than topk (interval above 0)"
        if hi < 0:
            return "lower loss than topk (interval below 0)"
        return "interval includes 0: no difference shown"


def paired(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> Paired:
    """``a`` and ``b`` map seed -> value; the pairs are the seeds both have."""
    seeds = sorted(set(a) & set(b))
    return Paired(seeds, [a[s] - b[s] for s in seeds], level)


# -- the runs -----------------------------------------------------------------------------------------------------
def budget_tokens(budget: str) -> int:
    return int(yaml.safe_load((STUDY_CONF_DIR / "budget" / f"{budget}.yaml").read_text())["budget_tokens"])


def budget_steps(budget: str) -> int:
    return int(yaml.safe_load((STUDY_CONF_DIR / "budget" / f"{budget}.yaml").read_text())["trainer"]["max_steps"])


def run_lr(run_dir: Path) -> float | None:
    """The run's lr from its saved config (``.hydra/config.yaml``, written by moe-train)."""
    p = run_dir / ".hydra" / "config.yaml"
    try:
        return float(yaml.safe_load(p.read_text())["optimizer"]["lr"]) if p.is_file() else None
    except (KeyError, TypeError, ValueError):
        return None


def grid_records(root: Path) -> list[dict[str, Any]]:
    """One record per finished grid run under ``root`` (``<arm>-<budget>-s<seed>/`` with a complete report.json)."""
    recs = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        m = GRID_DIR.match(d.name)
        if not (d.is_dir() and m) or not (STUDY_CONF_DIR / "budget" / f"{m['budget']}.yaml").is_file():
            continue
        rep = read_report(d)
        if rep is None or int(rep.get("steps") or 0) < budget_steps(m["budget"]):
            continue
        churn = rep.get("churn") or []
        recs.append({"arm": m["arm"], "budget": m["budget"], "budget_tokens": budget_tokens(m["budget"]),
                     "seed": int(m["seed"]), "val_loss": float(rep["val_loss"]),
                     "val_loss_per_domain": rep.get("val_loss_per_domain", {}),
                     "tokens_per_s": rep.get("tokens_per_s"), "steps": rep.get("steps"),
                     "train_tokens": rep.get("train_tokens"), "wall_seconds": rep.get("wall_seconds"),
                     "train_seconds": rep.get("train_seconds"),
                     "churn": churn[-1].get("churn") if churn else None,
                     "churn_from_init": churn[-1].get("churn_from_init") if churn else None,
                     "lr": run_lr(d), "run": d.name})
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(recs, key=lambda r: (r["budget_tokens"], order.get(r["arm"], len(order)), r["arm"], r["seed"]))


def write_summary(recs: list[dict[str, Any]], path: Path) -> None:
    domains = list(dict.fromkeys(d for r in recs for d in r["val_loss_per_domain"]))
    cols = ["arm", "budget", "budget_tokens", "seed", "val_loss", *[f"val_loss_{d}" for d in domains],
            "tokens_per_s", "steps", "train_tokens", "wall_seconds", "train_seconds", "churn_final",
            "churn_from_init_final", "lr", "run"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in recs:
            w.writerow([r["arm"], r["budget"], r["budget_tokens"], r["seed"], r["val_loss"],
                        *[r["val_loss_per_domain"].get(d, "") for d in domains], r["tokens_per_s"], r["steps"],
                        r["train_tokens"], r["wall_seconds"], r["train_seconds"],
                        "" if r["churn"] is None else r["churn"],
                        "" if r["churn_from_init"] is None else r["churn_from_init"],
                        "" if r["lr"] is None else r["lr"], r["run"]])


def gaps(recs: list[dict[str, Any]], budgets: list[str]) -> dict[str, dict[str, Paired]]:
    """budget -> arm -> the paired differences of the arm's val_loss to topk's."""
    out: dict[str, dict[str, Paired]] = {}
    for b in budgets:
        by_arm: dict[str, dict[int, float]] = {}
        for r in recs:
            if r["budget"] == b:
                by_arm.setdefault(r["arm"], {})[r["seed"]] = r["val_loss"]
        ref = by_arm.get(REFERENCE, {})
        out[b] = {arm: paired(v, ref) for arm, v in by_arm.items() if arm != REFERENCE}
    return out


def plot_gaps(g: dict[str, dict[str, Paired]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    arms = [a for a in ARMS if any(a in g[b] for b in g)]
    for i, arm in enumerate(arms):
        pts = [(budget_tokens(b), g[b][arm]) for b in g if arm in g[b] and g[b][arm].n]
        if not pts:
            continue
        shift = 1 + 0.03 * (i - (len(arms) - 1) / 2)  # side by side on the log axis
        xs = [x * shift for x, _ in pts]
        ys = [p.mean for _, p in pts]
        err = [0.0 if math.isnan(p.half_width) else p.half_width for _, p in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{arm} (n={','.join(str(p.n) for _, p in pts)})")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens per run (budget)")
    ax.set_ylabel(f"val loss - {REFERENCE} val loss (nats/token)")
    ax.set_title(f"Gap to {REFERENCE}: mean of paired per-seed differences, 95% t interval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def domain_gaps(rows: list[dict[str, Any]]) -> dict[str, dict[str, Paired]]:
    """arm -> validation domain -> paired differences of the arm's loss on that domain to topk's (one budget's
    runs)."""
    ref = {r["seed"]: r["val_loss_per_domain"] for r in rows if r["arm"] == REFERENCE}
    domains = list(dict.fromkeys(d for r in rows for d in r["val_loss_per_domain"]))
    out: dict[str, dict[str, Paired]] = {}
    for arm in [a for a in ARMS if a != REFERENCE and any(r["arm"] == a for r in rows)]:
        mine = {r["seed"]: r["val_loss_per_domain"] for r in rows if r["arm"] == arm}
        out[arm] = {d: paired({s: v[d] for s, v in mine.items() if d in v},
                              {s: v[d] for s, v in ref.items() if d in v}) for d in domains}
    return out


def domain_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per arm and validation domain, the paired mean difference to topk (and n); empty without
    per-domain losses or without topk runs."""
    g = domain_gaps(rows)
    domains = list(next(iter(g.values()), {}))
    if not domains or not any(p.n for arm in g.values() for p in arm.values()):
        return []
    lines = ["Per validation domain, paired mean Δ vs topk (nats/token; n as above):", "",
             "| arm | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for arm, by_domain in g.items():
        cells = ("-" if not p.n else f"{round(p.mean, 3) + 0.0:+.3f}" for p in by_domain.values())  # no "-0.000"
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def report_text(study: str, recs: list[dict[str, Any]], g: dict[str, dict[str, Paired]],
                tuning: list[dict[str, Any]], missing: list[str]) -> str:
    L = [f"# Router study v2 ({study})", ""]
    if study.endswith("_smoke"):
        L += ["> **Smoke study**: the tiny model, a few CPU steps. These numbers test the pipeline; they say nothing "
              "about the question.", ""]
    L += [f"- finished grid runs: {len(recs)}; missing or unfinished: {len(missing)}"
          + (f" ({', '.join(missing)})" if missing else ""),
          "- statistics: per budget, d_s = val_loss(arm, seed s) - val_loss(topk, seed s) over the seeds both have "
          "finished; mean ± t(0.975, n-1) * sd / sqrt(n) (95%, Student's t). An interval that includes 0 shows no "
          "difference (nor equality).", ""]
    by_budget = list(g)
    for b in by_budget:
        rows = [r for r in recs if r["budget"] == b]
        L += [f"## Budget {b} ({budget_tokens(b):,} training tokens)", "",
              "| arm | n | val loss (mean over seeds) | Δ vs topk (paired mean) | 95% CI | per-seed Δ | reading |",
              "|---|---|---|---|---|---|---|"]
        for arm in [a for a in ARMS if any(r["arm"] == a for r in rows)]:
            vals = [r["val_loss"] for r in rows if r["arm"] == arm]
            mean = f"{statistics.fmean(vals):.4f}"
            if arm == REFERENCE:
                L.append(f"| {arm} | {len(vals)} | {mean} | (reference) | | | |")
                continue
            p = g[b][arm]
            ci = "-" if p.n < 2 else f"[{p.ci[0]:+.4f}, {p.ci[1]:+.4f}]"
            delta = "-" if not p.n else f"{p.mean:+.4f}"
            seeds = ", ".join(f"s{s} {d:+.4f}" for s, d in zip(p.seeds, p.diffs)) or "-"
            L.append(f"| {arm} | {p.n} | {mean} | {delta} | {ci} | {seeds} | {p.verdict()} |")
        L += ["", *domain_table(rows), ""]
    if tuning:
        L += ["## Tuning (chosen: lowest validation loss per arm; the grid runs the chosen settings)", "",
              "| arm | lr | router_lr_scale | load_balance | z_loss | val loss | tokens/s | chosen |",
              "|---|---|---|---|---|---|---|---|"]
        for r in tuning:
            vl = f"{float(r['val_loss']):.4f}" if r["val_loss"] != "" else "unfinished"
            tps = f"{float(r['tokens_per_s']):,.0f}" if r["tokens_per_s"] not in ("", None) else "-"
            L.append(f"| {r['arm']} | {r['lr']:g} | {r['router_lr_scale']} | {r['loss.load_balance']} | "
                     f"{r['loss.z_loss']} | {vl} | {tps} | {'**yes**' if r['chosen'] else ''} |")
        L.append("")
    L += ["## Files", "", "- `summary.csv` (one row per grid run), `tuning.csv` (one row per tuning run), "
          "`gap_vs_tokens.png`", ""]
    return "\n".join(L)


def expected(arms: list[str], budgets: list[str], seeds: list[int]) -> list[str]:
    return [f"{a}-{b}-s{s}" for b in budgets for a in arms for s in seeds]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="router_study_v2")
    p.add_argument("--study-root", type=Path, help="the runs (default: the study config's study_root)")
    p.add_argument("--out", type=Path, help="default: results/<study>")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--budgets", default=",".join(BUDGETS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tune-budget", default=BUDGETS[0])
    a = p.parse_args(argv)
    out = a.out or Path("results") / a.study
    root = a.study_root or study_root(a.study)
    arms, budgets = a.arms.split(","), a.budgets.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    recs = grid_records(root)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(recs, out / "summary.csv")
    tuning = tuning_rows(root, budget_steps(a.tune_budget))
    write_tuning_csv(tuning, out / "tuning.csv")
    have = {r["run"] for r in recs}
    missing = [name for name in expected(arms, budgets, seeds) if name not in have]
    g = gaps(recs, budgets)
    plot_gaps(g, out / "gap_vs_tokens.png")
    (out / "report.md").write_text(report_text(a.study, recs, g, tuning, missing))
    print(f"wrote {out}/report.md, summary.csv ({len(recs)} runs), tuning.csv ({len(tuning)} runs), "
          f"gap_vs_tokens.png; {len(missing)} grid runs missing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
