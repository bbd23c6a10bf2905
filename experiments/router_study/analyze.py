"""Router study report: every run's report.json plus moe-analyze metrics on its checkpoint, mean ± std over seeds
per arm, written to ``results/<study>/``.

    python experiments/router_study/analyze.py --study router_study          # runs/router_study -> results/router_study
    python experiments/router_study/analyze.py --study router_study --report-only   # from results/router_study alone
    python experiments/router_study/analyze.py --study router_study --report-only --run-plots  # + per-run figures

Per run (``results/<study>/runs/<arm>-s<seed>/``): the moe-analyze files (table5, plots, tokens.html,
metrics.json) over each domain's validation windows, a copy of the run's report.json, ``run.json`` (what the
study report reads) and, when the run logged to offline W&B, ``history.json`` (its loss curves). A run whose
checkpoint did not change since its run.json is not analysed again. Study files: ``report.md`` (tables and the
answers the numbers allow), ``summary.csv`` (per arm), ``runs.csv`` (per run), ``val_loss_per_domain.png``,
``learning_curves.png``, ``token_id_predictability.png``, ``routing_per_layer.png``.

Git keeps each run's table5 and metrics.json, not its figures: ``--run-plots`` redraws the plots from
metrics.json, and ``moe-analyze`` on the run's checkpoint writes tokens.html.

The rule: a difference between two arms is called a difference only when |mean_a - mean_b| > std_a + std_b
(sample std over seeds) and both arms have at least 2 seeds. Anything else is reported as within the seed spread.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import ARMS, OnDevice, RunInfo, datamodule_for, find_runs, pick_device, study_root  # noqa: E402
from wandb_history import read_history  # noqa: E402

REFERENCE = "topk"
LAYER_METRICS = {  # per-layer routing metric -> label (metrics no run has are left out of the report)
    "token_id_predictability": "token-id predictability",
    "token_id_predictability_heldout_by_doc": "token-id predictability, held out by document",
    "token_id_predictability_heldout": "token-id predictability, even vs odd windows (not held out: documents "
                                       "span windows)",
    "vocabulary_specialization": "vocabulary specialisation",
    "repeat_first": "first-choice repeat rate",
    "span_coherence": "span coherence",
    "load_max_over_mean": "load max/mean",
}
RANDOM = "_random"  # <metric>_random: the metric for uniformly random routing of the same tokens (its floor)
QUESTIONS = {
    "hash": ("hash_random", "hash_balanced", "hash_distilled"),
    "span": ("span_head", "span_first_piece", "span_prefix"),
}


# -- statistics and the difference rule ------------------------------------------------------------------------
@dataclass
class Stat:
    """Mean and sample standard deviation over seeds (std is nan with fewer than 2 values)."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n >= 2 else math.nan

    def text(self, digits: int = 3) -> str:
        if not self.values:
            return "-"
        return f"{self.mean:.{digits}f}" if self.n < 2 else f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(values: list[float | None]) -> Stat:
    return Stat([float(v) for v in values if v is not None and not math.isnan(float(v))])


def differs(a: Stat, b: Stat) -> bool:
    """The study's rule: a difference only when both arms have >= 2 seeds and |Δmean| > std_a + std_b."""
    return a.n >= 2 and b.n >= 2 and abs(a.mean - b.mean) > a.std + b.std


def cell(a: Stat, b: Stat) -> str:
    """A table cell for mean_a - mean_b: bold beyond the seed spread, ``(n<2)`` when it cannot be judged."""
    if not a.n or not b.n:
        return "-"
    d = f"{a.mean - b.mean:+.3f}"
    return f"**{d}**" if differs(a, b) else (d if a.n >= 2 and b.n >= 2 else f"{d} (n<2)")


def compare(name_a: str, a: Stat, name_b: str, b: Stat, what: str = "validation loss", unit: str = "nats/token",
            lower_is_better: bool = True) -> str:
    """One sentence comparing arm a with arm b that never calls a difference the rule does not allow."""
    if a.n < 2 or b.n < 2:
        return (f"{name_a} vs {name_b}: not compared ({what}: {a.text()} vs {b.text()}); the rule needs at least 2 "
                f"seeds per arm, have {a.n} and {b.n}")
    delta, spread = a.mean - b.mean, a.std + b.std
    if not differs(a, b):
        return (f"{name_a} vs {name_b}: no difference beyond the seed spread ({what} {a.text()} vs {b.text()}; "
                f"Δ = {delta:+.3f}, |Δ| ≤ std sum {spread:.3f})")
    better = (delta < 0) == lower_is_better
    return (f"{name_a} vs {name_b}: **{name_a} is {'better' if better else 'worse'}** by {abs(delta):.3f} {unit} "
            f"({what} {a.text()} vs {b.text()}; |Δ| > std sum {spread:.3f})")


# -- one run ------------------------------------------------------------------------------------------------------
def _stamp(path: Path) -> dict[str, int] | None:
    if not path.is_file():
        return None
    s = path.stat()
    return {"size": s.st_size, "mtime_ns": s.st_mtime_ns}


def heldout_predictability(data: dict[str, Any], layer: int, num_experts: int) -> dict[str, float]:
    """Token-id predictability fitted on half of the analysed documents and scored on the other half (ids unseen in
    the fitting half get the most used expert): how well a fixed table would predict the router on new text; and
    the same for uniformly random routing of the same tokens. (v1 of this study split even and odd windows, which
    share the documents they were cut from: that was not held out.)"""
    from moe_variants.analysis import heldout_token_id_predictability, random_routing_baseline

    eids, ids, doc = data["expert_ids"][layer], data["input_ids"], data["doc_start"]
    fn = lambda e: heldout_token_id_predictability(e, ids, doc)  # noqa: E731
    key = "token_id_predictability_heldout_by_doc"
    return {key: fn(eids), key + RANDOM: random_routing_baseline(fn, ids.shape, num_experts, eids.shape[-1])}


def analyse_run(run: RunInfo, out: Path, *, sequences_per_domain: int = 32, batch_size: int = 8,
                device: str = "auto", force: bool = False, data_overrides: dict[str, Any] | None = None
                ) -> dict[str, Any] | None:
    """``out/runs/<name>/run.json`` for a finished run (None if it has no report.json yet)."""
    from moe_variants.analysis import paper_layers
    from moe_variants.analysis.analyze import analyze, collect
    from moe_variants.training.build import load_model

    report = run.report()
    if report is None:
        return None
    rdir = out / "runs" / run.name
    cached = rdir / "run.json"
    stamp = _stamp(run.checkpoint)
    if cached.is_file() and not force:
        old = json.loads(cached.read_text())
        if stamp is None or old.get("checkpoint_stamp") == stamp:
            return old
    rdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(run.run_dir / "report.json", rdir / "report.json")
    record: dict[str, Any] = {"arm": run.arm, "seed": run.seed, "name": run.name, "run_dir": str(run.run_dir),
                              "report": report, "checkpoint_stamp": stamp, "layers": None}
    if stamp is not None:
        t0 = time.perf_counter()
        model, cfg = load_model(run.checkpoint)
        dm = datamodule_for(cfg, val_sequences_per_domain=sequences_per_domain, batch_size=batch_size,
                            **(data_overrides or {}))
        data = collect(OnDevice(model, pick_device(device)), dm.val_dataloader(), None)
        model.cpu()
        n = len(model.layers)
        pieces = [dm.tokenizer.id_to_token(i) or "" for i in range(dm.vocab_size)] if dm.tokenizer else \
            [str(i) for i in range(dm.vocab_size)]
        metrics = analyze(model, data, dm.domains, pieces, rdir, paper_layers(n))
        record["layers"] = [{"layer": p["layer"], "token_id_predictability": p["token_id_predictability"],
                             "token_id_predictability" + RANDOM: p["token_id_predictability" + RANDOM],
                             **heldout_predictability(data, p["layer"], model.args.num_experts),
                             "vocabulary_specialization": p["vocabulary_specialization"],
                             "vocabulary_specialization" + RANDOM: p["vocabulary_specialization" + RANDOM],
                             "repeat_first": p["repeat_first"], "repeat_any": p["repeat_any"],
                             "span_coherence": p["span_coherence"]["first"],
                             "span_coherence_all": p["span_coherence"]["all"],
                             "router_entropy": p["router_entropy"],
                             "load_max_over_mean": p["load_balance"]["max_over_mean"],
                             "load_cv": p["load_balance"]["cv"]} for p in metrics["layers"]]
        record["baselines"] = metrics["baselines"]
        record["analysis_windows_per_domain"] = sequences_per_domain
        record["analysis_seconds"] = time.perf_counter() - t0
    cached.write_text(json.dumps(record, indent=2, default=str))
    return record


def run_plots(out: Path) -> list[Path]:
    """Redraw moe-analyze's figures of every ``out/runs/<name>/`` (load per domain, load heatmap, repeat rates)
    from its ``metrics.json``, as ``analyse_run`` drew them: git keeps the numbers, not the 3 MB of pictures."""
    from moe_variants.analysis import paper_layers, plot_load_heatmap, plot_load_per_domain, plot_repeat_rates

    done = []
    for path in sorted((out / "runs").glob("*/metrics.json")):
        m = json.loads(path.read_text())
        layers, domains, rdir = m["layers"], m["domains"], path.parent
        view = paper_layers(len(layers))  # the layers analyse_run shows
        plot_load_per_domain({i: [layers[i]["expert_load_per_domain"][d] for d in domains] for i in view}, domains,
                             rdir / "load_per_domain.png")
        plot_load_heatmap([p["expert_load"] for p in layers], rdir / "load_heatmap.png")
        plot_repeat_rates({k: {d: [p[f"repeat_{k}_per_domain"][d] for p in layers] for d in domains}
                           for k in ("first", "any")}, m["baselines"], rdir / "repeat_rates.png")
        done.append(rdir)
    return done


def load_records(out: Path) -> list[dict[str, Any]]:
    """Every ``out/runs/*/run.json`` (what --report-only reads)."""
    recs = []
    for p in sorted((out / "runs").glob("*/run.json")):
        rec = json.loads(p.read_text())
        hist = p.with_name("history.json")
        rec["history"] = json.loads(hist.read_text()) if hist.is_file() else {}
        recs.append(rec)
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(recs, key=lambda r: (order.get(r["arm"], len(order)), r["arm"], r["seed"]))


# -- aggregation --------------------------------------------------------------------------------------------------
def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """arm -> {seeds, val_loss: Stat, val_loss_per_domain: {d: Stat}, tokens_per_s: Stat, layers: {metric: [Stat]},
    layer_mean: {metric: Stat}, routers: [...]}."""
    arms: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(r["arm"] for r in records):
        rs = [r for r in records if r["arm"] == arm]
        reps = [r["report"] for r in rs]
        domains = list(dict.fromkeys(d for rep in reps for d in rep.get("val_loss_per_domain", {})))
        agg: dict[str, Any] = {
            "seeds": [r["seed"] for r in rs],
            "routers": sorted({x for rep in reps for x in rep.get("routers", [])}),
            "val_loss": stat([rep.get("val_loss") for rep in reps]),
            "val_loss_per_domain": {d: stat([rep.get("val_loss_per_domain", {}).get(d) for rep in reps])
                                    for d in domains},
            "tokens_per_s": stat([rep.get("tokens_per_s") for rep in reps]),
            "layers": {}, "layer_mean": {},
        }
        agg["val_curve"], agg["train_curve"] = curves([r.get("history", {}) for r in rs])
        analysed = [r["layers"] for r in rs if r.get("layers")]
        if analysed:
            n_layers = min(len(x) for x in analysed)
            for m in [*LAYER_METRICS, *(k + RANDOM for k in LAYER_METRICS)]:
                if not any(m in p for x in analysed for p in x):
                    continue  # saved before this metric existed
                agg["layers"][m] = [stat([x[i].get(m) for x in analysed]) for i in range(n_layers)]
                agg["layer_mean"][m] = stat([layer_mean(x[:n_layers], m) for x in analysed])
        arms[arm] = agg
    return arms


def layer_mean(layers: list[dict[str, Any]], metric: str) -> float | None:
    """The mean of a metric over layers; None when a layer lacks it (a run.json saved before it existed)."""
    values = [p.get(metric) for p in layers]
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def curves(histories: list[dict[str, Any]]) -> tuple[dict[int, Stat], list[tuple[int, float]]]:
    """Validation loss per validation step (a Stat over the seeds that logged it) and the seed-mean training loss
    per logged step, from the runs' W&B histories (``history.json``)."""
    val: dict[int, list[float]] = {}
    train: dict[int, list[float]] = {}
    for h in histories:
        for step, v in h.get("val/loss", []):
            val.setdefault(int(step), []).append(v)
        for step, v in h.get("train/loss", []):
            train.setdefault(int(step), []).append(v)
    return ({k: stat(v) for k, v in sorted(val.items())},
            [(k, statistics.fmean(v)) for k, v in sorted(train.items()) if len(v) == len(histories)])


# -- outputs ------------------------------------------------------------------------------------------------------
def write_csvs(records: list[dict[str, Any]], arms: dict[str, dict[str, Any]], out: Path) -> None:
    domains = list(dict.fromkeys(d for a in arms.values() for d in a["val_loss_per_domain"]))
    cols = ["arm", "n_seeds", "seeds", "val_loss_mean", "val_loss_std"]
    cols += [f"val_loss_{d}_{s}" for d in domains for s in ("mean", "std")]
    cols += ["tokens_per_s_mean", "tokens_per_s_std"]
    metrics = [m for m in [*LAYER_METRICS, *(k + RANDOM for k in LAYER_METRICS)]
               if any(m in a["layer_mean"] for a in arms.values())]
    cols += [f"{m}_layer_mean_{s}" for m in metrics for s in ("mean", "std")]
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for arm, a in arms.items():
            row = [arm, len(a["seeds"]), " ".join(map(str, a["seeds"])), a["val_loss"].mean, a["val_loss"].std]
            for d in domains:
                s = a["val_loss_per_domain"].get(d, Stat([]))
                row += [s.mean, s.std]
            row += [a["tokens_per_s"].mean, a["tokens_per_s"].std]
            for m in metrics:
                s = a["layer_mean"].get(m, Stat([]))
                row += [s.mean, s.std]
            w.writerow(row)
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", "steps", "train_tokens", "val_loss", *[f"val_loss_{d}" for d in domains],
                    "tokens_per_s", *[f"{m}_layer_mean" for m in metrics]])
        for r in records:
            rep = r["report"]
            layer_means = [layer_mean(r["layers"], m) if r.get("layers") else "" for m in metrics]
            layer_means = ["" if v is None else v for v in layer_means]
            w.writerow([r["arm"], r["seed"], rep.get("steps"), rep.get("train_tokens"), rep.get("val_loss"),
                        *[rep.get("val_loss_per_domain", {}).get(d, "") for d in domains], rep.get("tokens_per_s"),
                        *layer_means])


def plot(arms: dict[str, dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def err(s: Stat) -> float:
        return 0.0 if math.isnan(s.std) else s.std

    written = []
    domains = list(dict.fromkeys(d for a in arms.values() for d in a["val_loss_per_domain"])) + ["all"]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(domains)), 4.5))
    width = 0.8 / max(1, len(arms))
    for i, (arm, a) in enumerate(arms.items()):
        stats = [a["val_loss_per_domain"].get(d, Stat([])) for d in domains[:-1]] + [a["val_loss"]]
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [s.mean for s in stats], width, yerr=[err(s) for s in stats], capsize=2,
               label=f"{arm} (n={len(a['seeds'])})")
    ax.set_xticks(range(len(domains)), domains, rotation=20)
    ax.set_ylabel("validation loss (nats/token)")
    lo = min((s.mean for a in arms.values() for s in [a["val_loss"], *a["val_loss_per_domain"].values()]
              if s.n), default=0.0)
    ax.set_ylim(bottom=max(0.0, lo - 0.5))
    ax.set_title("Validation loss per domain and arm (mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "val_loss_per_domain.png", dpi=120)
    plt.close(fig)
    written.append("val_loss_per_domain.png")

    with_curves = {arm: a for arm, a in arms.items() if a["val_curve"] or a["train_curve"]}
    if with_curves:
        fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
        for arm, a in with_curves.items():
            if a["train_curve"]:
                steps, losses = zip(*a["train_curve"])
                ax_t.plot([s + 1 for s in steps], losses, label=arm)
            if a["val_curve"]:
                steps = list(a["val_curve"])
                ax_v.errorbar([s + 1 for s in steps], [a["val_curve"][s].mean for s in steps],
                              yerr=[err(a["val_curve"][s]) for s in steps], marker="o", capsize=3, label=arm)
        ax_t.set(xlabel="step", ylabel="training loss (one batch, mean over seeds)", title="Training loss")
        ax_v.set(xlabel="step", ylabel="validation loss (mean ± std over seeds)", title="Validation loss")
        ax_t.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "learning_curves.png", dpi=110)
        plt.close(fig)
        written.append("learning_curves.png")

    with_layers = {arm: a for arm, a in arms.items() if a["layers"]}
    if not with_layers:
        return written

    def lines(ax: Any, metric: str) -> None:
        for arm, a in with_layers.items():
            if metric not in a["layers"]:
                continue
            stats = a["layers"][metric]
            line = ax.errorbar(range(len(stats)), [s.mean for s in stats], yerr=[err(s) for s in stats], marker="o",
                               capsize=2, label=arm)
            floor = a["layers"].get(metric + RANDOM)
            if floor:  # the same statistic for random routing of the same tokens, in the arm's colour
                ax.plot(range(len(floor)), [s.mean for s in floor], ls="--", lw=1, color=line.lines[0].get_color())
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(LAYER_METRICS[metric], fontsize=9)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines(ax, "token_id_predictability")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy of the best token id -> first expert table")
    if any("token_id_predictability" + RANDOM in a["layers"] for a in with_layers.values()):
        ax.set_xlabel("layer (dashed: uniformly random routing of the same tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "token_id_predictability.png", dpi=120)
    plt.close(fig)
    written.append("token_id_predictability.png")

    shown = [m for m in LAYER_METRICS if any(m in a["layers"] for a in with_layers.values())]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4), squeeze=False)
    axes = axes[0]
    for ax, metric in zip(axes, shown):
        lines(ax, metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "routing_per_layer.png", dpi=110)
    plt.close(fig)
    written.append("routing_per_layer.png")
    return written


BASELINED = ("token_id_predictability", "token_id_predictability_heldout_by_doc", "vocabulary_specialization")
# ^ statistics shown beside their floor: their value for uniformly random routing of the same tokens
FLOOR_NA = "n/a"
NA_NOTE = (f"{FLOOR_NA}: these runs' saved run.json files predate the random-routing floor (the statistic for "
           "uniformly random routing of the same tokens), so it is not shown; running this script on the "
           "checkpoints (without `--report-only`) computes it. That floor is well above 1/E for in-sample "
           "predictability and specialisation.")
PARITY_NOTE = ("These runs were analysed when the held-out split was by window: the table was fitted on the even "
               "analysis windows and scored on the odd ones. Windows are cut from one stream of documents, so long "
               "documents sit in both halves: that number is not held out (on this study's analysis windows a "
               "router that reads no token, expert = document id mod 8, scores 0.21 that way and 0.09-0.10 held "
               "out by document, where it cannot beat chance, 1/8). Running this script on the checkpoints "
               "(without `--report-only`) splits by document.")


def floors_missing(arms: dict[str, dict[str, Any]]) -> bool:
    """Whether some arm has a statistic of BASELINED without its random-routing floor (old run.json files)."""
    return any(m in a["layer_mean"] and m + RANDOM not in a["layer_mean"] for a in arms.values() for m in BASELINED)


def floor_text(a: dict[str, Any], metric: str) -> str:
    """An arm's mean over layers of ``metric`` for random routing of the same tokens, or n/a."""
    s = a["layer_mean"].get(metric + RANDOM)
    return s.text() if s is not None else FLOOR_NA


def report_text(records: list[dict[str, Any]], arms: dict[str, dict[str, Any]], study: str, missing: list[str],
                commands: list[str], distilled: dict[str, Any], plots: list[str]) -> str:
    ref = arms.get(REFERENCE)
    domains = list(dict.fromkeys(d for a in arms.values() for d in a["val_loss_per_domain"]))
    reps = [r["report"] for r in records]
    L: list[str] = [f"# Router study: learned top-2 vs token-id hash vs span routing ({study})", ""]
    if study.endswith("_smoke"):
        L += ["> **Smoke study**: the tiny model, a few CPU steps. These numbers test the pipeline; they say "
              "nothing about the question.", ""]
    steps = sorted({rep.get("steps") for rep in reps})
    tokens = sorted({rep.get("train_tokens") for rep in reps})
    params = reps[0].get("params", {}) if reps else {}
    L += [f"- runs: {len(records)} ({', '.join(arm + ' x' + str(len(a['seeds'])) for arm, a in arms.items())}); "
          f"steps per run: {', '.join(map(str, steps))}; training tokens per run: {', '.join(map(str, tokens))}",
          f"- parameters: {params.get('total', 0) / 1e6:.1f}M total, {params.get('active', 0) / 1e6:.1f}M active"
          if params else "- parameters: -",
          "- missing or unfinished runs: " + (", ".join(missing) if missing else "none"),
          "",
          "**Rule.** A difference between two arms is called a difference only when both have at least 2 seeds and "
          "|mean_a - mean_b| > std_a + std_b (sample std over seeds). Everything else is *within the seed spread*, "
          "which is not evidence of equality either. This is a conservative screen, not a significance test.", ""]

    L += ["## Validation loss (nats/token, mean ± std over seeds)", "",
          "| arm | n | all | " + " | ".join(domains) + " | tokens/s |",
          "|---|---|---|" + "---|" * len(domains) + "---|"]
    for arm, a in arms.items():
        L.append(f"| {arm} | {len(a['seeds'])} | {a['val_loss'].text()} | "
                 + " | ".join(a["val_loss_per_domain"].get(d, Stat([])).text() for d in domains)
                 + f" | {a['tokens_per_s'].text(0)} |")
    L += ["", "tokens/s: each run's training throughput as it ran. Runs that shared a GPU or a host (a sweep with "
          "`--parallel` > the number of GPUs) do not make a speed comparison; `experiments/bench/throughput.py` "
          "does (`results/bench/`)."]
    if ref is not None:
        L += ["", f"Δ against `{REFERENCE}` (negative = lower loss). **Bold**: exceeds the seed spread (a "
              "difference); plain: within the spread (no difference called); `n<2`: too few seeds to judge.", "",
              "| arm | all | " + " | ".join(domains) + " |", "|---|---|" + "---|" * len(domains)]

        for arm, a in arms.items():
            if arm == REFERENCE:
                continue
            L.append(f"| {arm} | {cell(a['val_loss'], ref['val_loss'])} | " + " | ".join(
                cell(a["val_loss_per_domain"].get(d, Stat([])), ref["val_loss_per_domain"].get(d, Stat([])))
                for d in domains) + " |")
    L.append("")

    steps = sorted({s for a in arms.values() for s in a["val_curve"]})
    if steps and ref is not None and ref["val_curve"]:
        L += ["## Validation loss during training (all domains; from the runs' W&B histories)", "",
              "Mean ± std over seeds at each validation step; Δ against "
              f"`{REFERENCE}` at the same step (bold: beyond the seed spread).", "",
              "| arm | " + " | ".join(f"step {s + 1}" for s in steps) + " | " + " | ".join(
                  f"Δ at {s + 1}" for s in steps) + " |", "|---|" + "---|" * (2 * len(steps))]
        for arm, a in arms.items():
            vals = [a["val_curve"].get(s, Stat([])) for s in steps]
            refs = [ref["val_curve"].get(s, Stat([])) for s in steps]
            deltas = ["" if arm == REFERENCE else cell(v, r) for v, r in zip(vals, refs)]
            L.append(f"| {arm} | " + " | ".join(v.text() for v in vals) + " | " + " | ".join(deltas) + " |")
        L.append("")

    L += ["## The questions", ""]
    L += ["**1. Is learned routing close to token-id routing?** Token-id predictability is the accuracy of the best "
          "token id -> first-choice expert table on the analysis tokens (in-sample, so an upper bound; 1.0 = the "
          "router is a function of the token id, as every hash arm is by construction). Its floor is not 1/E: "
          "routing that ignores the token id scores well above 1/E in-sample, because every id seen once is "
          "predicted perfectly, so each number is read against the same statistic for uniformly random routing of "
          "the same tokens (`random`). The held-out version fits the table on half of the analysed documents and "
          "scores it on the other half (ids unseen in the fitting half count against it, so even a hash router "
          "scores below 1)."]
    if ref is not None and ref["layers"]:
        tip = ref["layers"]["token_id_predictability"]
        by_doc = "token_id_predictability_heldout_by_doc"
        held = (f"held out by document: {ref['layer_mean'][by_doc].text()}, random: {floor_text(ref, by_doc)}"
                if by_doc in ref["layer_mean"] else "even vs odd windows, not held out: "
                + ref["layer_mean"]["token_id_predictability_heldout"].text())
        L.append(f"`{REFERENCE}`: {ref['layer_mean']['token_id_predictability'].text()} averaged over layers "
                 f"(random routing of the same tokens: {floor_text(ref, 'token_id_predictability')}; {held}); "
                 "per layer " + ", ".join(f"L{i} {s.text(2)}" for i, s in enumerate(tip)) + ".")
        if by_doc not in ref["layer_mean"]:
            L.append(PARITY_NOTE)
        if floors_missing(arms):
            L.append(NA_NOTE)
    if distilled:
        fits = [statistics.fmean(d["table_matches_router_per_layer"]) for d in distilled.values()]
        L.append(f"The distilled tables reproduce {100 * statistics.fmean(fits):.1f}% of the top-2 routers' (token, "
                 f"expert) choices on the training windows they were read from ({len(distilled)} table(s)).")
    L += ["", "**Do hash routers lose little against learned routing?**", ""]
    L += [f"- {compare(arm, arms[arm]['val_loss'], REFERENCE, ref['val_loss'])}"
          for arm in QUESTIONS["hash"] if arm in arms and ref is not None] or ["- no hash arm or no topk runs yet"]
    L += ["", "**2. Does span routing keep the quality of learned routing?**", ""]
    L += [f"- {compare(arm, arms[arm]['val_loss'], REFERENCE, ref['val_loss'])}"
          for arm in QUESTIONS["span"] if arm in arms and ref is not None] or ["- no span arm or no topk runs yet"]
    others = [a for a in arms if a != REFERENCE and not any(a in v for v in QUESTIONS.values())]
    L += [f"- {compare(arm, arms[arm]['val_loss'], REFERENCE, ref['val_loss'])}" for arm in others if ref is not None]
    L.append("")

    with_layers = {arm: a for arm, a in arms.items() if a["layers"]}
    if with_layers:
        L += ["## Routing per layer (validation windows of every domain; mean ± std over seeds)", ""]
        if floors_missing(with_layers):
            L += [NA_NOTE, ""]
        n_layers = max(len(a["layers"]["token_id_predictability"]) for a in with_layers.values())
        for m, label in LAYER_METRICS.items():
            if not any(m in a["layers"] for a in with_layers.values()):
                continue
            L += [f"**{label}**", "", "| arm | mean over layers | " + " | ".join(f"L{i}" for i in range(n_layers))
                  + " |", "|---|---|" + "---|" * n_layers]
            for arm, a in with_layers.items():
                for name, key in [(arm, m)] + ([(f"{arm}, random routing", m + RANDOM)] if m in BASELINED else []):
                    if key not in a["layers"]:
                        L.append(f"| {name} | {FLOOR_NA} |" + f" {FLOOR_NA} |" * n_layers)
                        continue
                    cells = [s.text(3) for s in a["layers"][key]] + ["-"] * (n_layers - len(a["layers"][key]))
                    L.append(f"| {name} | {a['layer_mean'][key].text(3)} | " + " | ".join(cells) + " |")
            L.append("")
        base = next((r["baselines"] for r in records if r.get("baselines")), None)
        if base:
            L += [f"Random-routing references: first-choice repeat {base['first']:.3f}, top-K overlap "
                  f"{base['any']:.3f}. Load max/mean: 1 = perfectly balanced, E = everything on one expert. Span "
                  "coherence: share of multi-token words whose pieces all share their first expert.", ""]
    L += ["## Files", ""] + [f"- `{p}`" for p in plots] + [
        "- `summary.csv` (per arm), `runs.csv` (per run), `runs/<arm>-s<seed>/` (moe-analyze output per run, its "
        "report.json, and run.json: what this report reads)", ""]
    L += ["## Commands", "", "```bash", *commands, "```", ""]
    return "\n".join(L)


def study_commands(study: str, root: Path, out: Path) -> list[str]:
    rel = (lambda p: str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p))  # noqa: E731
    return [
        "# all runs, distillation and this report (skips finished runs, resumes unfinished ones)",
        f"python experiments/router_study/sweep.py --study {study}",
        "# or step by step (the study's configs are in experiments/router_study/conf/, not in moe-train's conf/):",
        f"STUDY=('hydra.searchpath=[file://experiments/router_study/conf]' +study={study})",
        *[f'moe-train -m "${{STUDY[@]}}" arm={a} seed=0,1,2 ckpt_path=last' for a in ARMS[:-1]],
        f"python experiments/router_study/distill_hash.py --study {study} --seeds 0,1,2",
        'moe-train -m "${STUDY[@]}" arm=hash_distilled seed=0,1,2 ckpt_path=last',
        f"python experiments/router_study/analyze.py --study {study} --study-root {rel(root)} --out {rel(out)}",
        "# regenerate this report (and each run's figures) from the results folder alone (no checkpoints needed):",
        f"python experiments/router_study/analyze.py --study {study} --out {rel(out)} --report-only --run-plots",
    ]


def write_report(records: list[dict[str, Any]], out: Path, study: str, root: Path, missing: list[str],
                 distilled: dict[str, Any]) -> str:
    arms = aggregate(records)
    out.mkdir(parents=True, exist_ok=True)
    write_csvs(records, arms, out)
    plots = plot(arms, out) if arms else []
    md = report_text(records, arms, study, missing, study_commands(study, root, out), distilled, plots)
    (out / "report.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="router_study", help="the study config: router_study | router_study_smoke")
    p.add_argument("--study-root", type=Path, help="the runs (default: the study config's study_root)")
    p.add_argument("--out", type=Path, help="default: results/<study>")
    p.add_argument("--report-only", action="store_true", help="regenerate from <out>/runs/*/run.json alone")
    p.add_argument("--run-plots", action="store_true",
                   help="also redraw each run's moe-analyze figures from its metrics.json (they are not kept in git)")
    p.add_argument("--sequences-per-domain", type=int, default=32, help="validation windows per domain analysed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="analyse every run again")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="override the runs' data config, e.g. --data corpus_dir=/path (repeatable)")
    a = p.parse_args(argv)
    out = a.out or Path("results") / a.study
    root = a.study_root or (study_root(a.study) if not a.report_only else Path("runs") / a.study)
    missing: list[str] = []
    if not a.report_only:
        data = dict(kv.split("=", 1) for kv in a.data)
        for run in find_runs(root):
            rec = analyse_run(run, out, sequences_per_domain=a.sequences_per_domain, batch_size=a.batch_size,
                              device=a.device, force=a.force, data_overrides=data)
            print(f"{run.name}: {'unfinished (no report.json)' if rec is None else 'ok'}")
            if rec is None:
                missing.append(run.name)
                continue
            history = read_history(run.run_dir)  # training curves from the run's offline W&B files, if any
            if history:
                (out / "runs" / run.name / "history.json").write_text(json.dumps(history))
        for f in sorted((root / "distilled_hash").glob("*.pt.json")):
            (out / "distilled_hash").mkdir(parents=True, exist_ok=True)
            shutil.copy(f, out / "distilled_hash" / f.name)
        if missing:  # kept only while some runs are missing, so that --report-only can name them
            (out / "missing.json").write_text(json.dumps(missing))
        else:
            (out / "missing.json").unlink(missing_ok=True)
    elif (out / "missing.json").is_file():
        missing = json.loads((out / "missing.json").read_text())
    records = load_records(out)
    if not records:
        print(f"no finished runs under {root} (nor {out}/runs): nothing to report", file=sys.stderr)
        return 1
    distilled = {f.name: json.loads(f.read_text()) for f in sorted((out / "distilled_hash").glob("*.pt.json"))}
    write_report(records, out, a.study, root, missing, distilled)
    print(f"wrote {out}/report.md ({len(records)} runs)")
    if a.run_plots:
        print(f"redrew the figures of {len(run_plots(out))} runs under {out}/runs/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
