"""Router study v2 driver: tune every arm at the smallest budget, choose its settings, then run the grid of arms x
budgets x seeds with them. Finished runs are skipped, unfinished ones resume (``ckpt_path=last``).

    python experiments/router_study/sweep_v2.py tune                 # every arm at b10M, seed 0, lr x {0.5, 1, 2};
                                                                     # topk also its knobs at its best lr
    python experiments/router_study/sweep_v2.py choose               # -> results/<study>/tuning.csv, chosen.yaml
    python experiments/router_study/sweep_v2.py grid --parallel 3    # arms x budgets x seeds with the chosen settings
    python experiments/router_study/sweep_v2.py all --launch-until 480   # tune, choose, grid, analyze_v2.py in order
    python experiments/router_study/sweep_v2.py plan                 # print the job list, run nothing
    python experiments/router_study/sweep_v2.py grid -- logger=csv   # extra moe-train overrides for every run

Runs: ``<study_root>/<arm>-<budget>-s<seed>/`` (grid), ``<study_root>/tune/<arm>-lr<lr>[-<knob><value>]-s0/``
(tuning), distilled tables in ``<study_root>/distilled_hash/`` (``topk-<budget>-s<seed>.pt``; ``tune-topk-s0.pt``
for tuning, from the best-lr topk tuning run). Logs: ``<study_root>/logs/<job>.log``. The grid starts with the
arms the study's conclusions need (topk, hash_random, span_vocab, dense), smallest budget first. Exit status: 0
all done, 1 a job failed or cannot run, 3 stopped launching at ``--launch-until`` (run the same command again).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _study import STUDY_CONF_DIR, run_jobs, study_config, study_overrides  # noqa: E402

ARMS = ("topk", "hash_random", "span_vocab", "dense", "hash_balanced", "span_head", "topk_frozen", "hash_distilled")
MINIMUM = ARMS[:4]  # the arms the study's conclusions need first (done-when: 3 budgets x 3 seeds each)
REFERENCE = "topk"
BUDGETS = ("b10M", "b32M", "b100M")
LR_FACTORS = (0.5, 1.0, 2.0)
# topk's extra knobs, each varied alone at topk's best lr: (config key, short name in run dirs, values)
TOPK_KNOBS = (("router_lr_scale", "rls", (0.1, 0.3)), ("loss.load_balance", "lb", (0.0, 0.04)),
              ("loss.z_loss", "z", (0.0,)))
KNOB_KEYS = {short: key for key, short, _ in TOPK_KNOBS}
NUM = r"\d[\d.]*(?:e[+-]?\d+)?"
TUNE_DIR = re.compile(rf"^(?P<arm>[a-z][a-z0-9_]*)-lr(?P<lr>{NUM})(?:-(?P<knob>[a-z]+)(?P<value>{NUM}))?"
                      rf"-s(?P<seed>\d+)$")
GRID_DIR = re.compile(r"^(?P<arm>[a-z][a-z0-9_]*)-(?P<budget>b\w+|tiny)-s(?P<seed>\d+)$")


def fmt(x: float) -> str:
    """A number as run-dir names write it: 0.0015, 0.1, 0."""
    return f"{x:g}"


@dataclass(frozen=True)
class Job:
    stage: str  # tune | grid
    kind: str  # train | distill
    arm: str
    budget: str
    seed: int
    lr: float | None = None  # tune: the lr; None with a knob: the arm's best lr of its lr runs (known when they end)
    knob: tuple[str, float] | None = None  # (short name, value), tune only
    after: tuple[str, ...] = ()  # job keys that must have succeeded first

    @property
    def key(self) -> str:
        if self.stage == "grid":
            return f"{self.kind}:{self.arm}-{self.budget}-s{self.seed}"
        lr = "best" if self.lr is None else fmt(self.lr)
        if self.kind == "distill":
            return f"tune-distill:{self.arm}-lr{lr}-s{self.seed}"
        knob = f"-{self.knob[0]}{fmt(self.knob[1])}" if self.knob else ""
        return f"tune:{self.arm}-lr{lr}{knob}-s{self.seed}"


def tune_name(arm: str, lr: float, knob: tuple[str, float] | None = None, seed: int = 0) -> str:
    return f"{arm}-lr{fmt(lr)}" + (f"-{knob[0]}{fmt(knob[1])}" if knob else "") + f"-s{seed}"


def plan_tune(arms: list[str], default_lr: dict[str, float], budget: str, factors: tuple[float, ...] = LR_FACTORS,
              seed: int = 0, knobs: tuple[str, ...] | None = None) -> list[Job]:
    """Every arm's lr grid (``factors`` x its default lr) at ``budget``; topk's knobs (``knobs``: config keys of
    TOPK_KNOBS, None = all) one at a time at its best lr; hash_distilled on a table distilled from the best-lr topk
    tuning run."""
    jobs: list[Job] = []
    lr_runs = {arm: [Job("tune", "train", arm, budget, seed, lr=default_lr[arm] * f) for f in factors]
               for arm in arms if arm != "hash_distilled"}
    if "hash_distilled" in arms and REFERENCE not in lr_runs:
        lr_runs[REFERENCE] = [Job("tune", "train", REFERENCE, budget, seed, lr=default_lr[REFERENCE] * f)
                              for f in factors]  # the distilled table needs topk's tuning runs
    for arm, runs in lr_runs.items():
        jobs += runs
    if REFERENCE in arms:
        ref = tuple(j.key for j in lr_runs[REFERENCE])
        jobs += [Job("tune", "train", REFERENCE, budget, seed, knob=(short, v), after=ref)
                 for key, short, values in TOPK_KNOBS if knobs is None or key in knobs for v in values]
    if "hash_distilled" in arms:
        distill = Job("tune", "distill", REFERENCE, budget, seed, after=tuple(j.key for j in lr_runs[REFERENCE]))
        jobs.append(distill)
        jobs += [Job("tune", "train", "hash_distilled", budget, seed, lr=default_lr["hash_distilled"] * f,
                     after=(distill.key,)) for f in factors]
    return jobs


def plan_grid(arms: list[str], budgets: list[str], seeds: list[int]) -> list[Job]:
    """arms x budgets x seeds: the minimum arms first, then the rest; within each, smallest budget first. Each
    hash_distilled run waits for the distillation of topk of the same (budget, seed)."""
    jobs: list[Job] = []
    for group in ([a for a in arms if a in MINIMUM], [a for a in arms if a not in MINIMUM]):
        for b in budgets:
            for s in seeds:
                for arm in group:
                    if arm == "hash_distilled":
                        ref = Job("grid", "train", REFERENCE, b, s).key
                        distill = Job("grid", "distill", REFERENCE, b, s, after=(ref,))
                        jobs += [distill, Job("grid", "train", arm, b, s, after=(distill.key,))]
                    else:
                        jobs.append(Job("grid", "train", arm, b, s))
    return jobs


# -- what is on disk ----------------------------------------------------------------------------------------------
def read_report(run_dir: Path) -> dict[str, Any] | None:
    p = run_dir / "report.json"
    return json.loads(p.read_text()) if p.is_file() else None


def finished(run_dir: Path, max_steps: int) -> bool:
    rep = read_report(run_dir)
    return rep is not None and int(rep.get("steps") or 0) >= max_steps


def tune_runs(root: Path) -> list[dict[str, Any]]:
    """Every tuning run under ``<root>/tune/``: arm, lr, the knob it varies, seed, its report (or None)."""
    out = []
    for d in sorted((root / "tune").iterdir()) if (root / "tune").is_dir() else []:
        m = TUNE_DIR.match(d.name)
        if not (d.is_dir() and m):
            continue
        knob = (m["knob"], float(m["value"])) if m["knob"] else None
        if knob and knob[0] not in KNOB_KEYS:
            continue
        out.append({"arm": m["arm"], "lr": float(m["lr"]), "knob": knob, "seed": int(m["seed"]), "name": d.name,
                    "run_dir": d, "report": read_report(d)})
    return out


def best_lr(root: Path, arm: str, lrs: list[float], max_steps: int, seed: int = 0) -> float | None:
    """The lr of ``arm``'s lr runs with the lowest validation loss, once all of them finished (else None)."""
    losses = {}
    for lr in lrs:
        d = root / "tune" / tune_name(arm, lr, None, seed)
        if not finished(d, max_steps):
            return None
        losses[lr] = float(read_report(d)["val_loss"])
    return min(losses, key=lambda lr: (losses[lr], lr))


def tuning_rows(root: Path, max_steps: int) -> list[dict[str, Any]]:
    """One row per tuning run (finished or not) with the columns of tuning.csv; ``chosen`` marks each arm's
    finished run with the lowest validation loss."""
    rows = []
    for r in tune_runs(root):
        rep = r["report"] or {}
        done = int(rep.get("steps") or 0) >= max_steps
        row = {"arm": r["arm"], "lr": r["lr"], **{key: "" for key, _, _ in TOPK_KNOBS},
               "val_loss": rep.get("val_loss", "") if done else "",
               "tokens_per_s": rep.get("tokens_per_s", "") if done else "", "steps": rep.get("steps", ""),
               "finished": done, "chosen": False, "run": r["name"]}
        if r["knob"]:
            row[KNOB_KEYS[r["knob"][0]]] = r["knob"][1]
        rows.append(row)
    for arm in dict.fromkeys(r["arm"] for r in rows):
        done = [r for r in rows if r["arm"] == arm and r["finished"]]
        if done:
            min(done, key=lambda r: (float(r["val_loss"]), r["run"]))["chosen"] = True
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(rows, key=lambda r: (order.get(r["arm"], len(order)), r["arm"], r["lr"], r["run"]))


def write_tuning_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["arm", "lr", *[key for key, _, _ in TOPK_KNOBS], "val_loss", "tokens_per_s", "steps", "finished",
            "chosen", "run"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def choose(root: Path, jobs: list[Job], max_steps: int, out: Path) -> dict[str, dict[str, float]]:
    """Write ``out/tuning.csv`` and ``out/chosen.yaml`` (arm -> the overrides of its best tuning run) for every arm
    whose planned tuning runs all finished; return the chosen overrides. Arms with unfinished runs are left out
    (and named)."""
    rows = tuning_rows(root, max_steps)
    write_tuning_csv(rows, out / "tuning.csv")
    chosen: dict[str, dict[str, float]] = {}
    for arm in dict.fromkeys(j.arm for j in jobs if j.kind == "train"):
        names = set()
        for j in (j for j in jobs if j.kind == "train" and j.arm == arm):
            lr = j.lr if j.lr is not None else best_lr(root, arm, [x.lr for x in jobs if x.arm == arm and x.knob
                                                                   is None and x.lr is not None], max_steps)
            names.add(None if lr is None else tune_name(arm, lr, j.knob, j.seed))
        have = {r["run"] for r in rows if r["arm"] == arm and r["finished"]}
        if None in names or not names <= have:
            print(f"[choose] {arm}: {len(names & have)} of {len(names)} tuning runs finished: not chosen yet")
            continue
        best = min((r for r in rows if r["run"] in names), key=lambda r: (float(r["val_loss"]), r["run"]))
        chosen[arm] = {"optimizer.lr": best["lr"],
                       **{key: best[key] for key, _, _ in TOPK_KNOBS if best[key] != ""}}
        print(f"[choose] {arm}: {' '.join(f'{k}={fmt(v)}' for k, v in chosen[arm].items())} "
              f"(val_loss {float(best['val_loss']):.4f}, {best['run']})")
    header = ("# Written by experiments/router_study/sweep_v2.py choose from tuning.csv (beside this file): per arm,\n"
              "# the overrides of its tuning run with the lowest validation loss. The grid passes them to every run.\n")
    (out / "chosen.yaml").write_text(header + yaml.safe_dump(chosen, sort_keys=False))
    return chosen


def read_chosen(path: Path) -> dict[str, dict[str, float]]:
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


# -- running ------------------------------------------------------------------------------------------------------
def prepare(study: str, arms: list[str], overrides: list[str]) -> None:
    """Check the training data and build the routers' corpus statistics once (cached on disk), so that parallel
    runs only read the caches."""
    from hydra.utils import instantiate

    from moe_variants.routers.spans import SpanDef
    from moe_variants.training.build import make_resources

    cfg = study_config(study, overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    limit = cfg.data.get("max_train_tokens")
    if limit is not None and len(dm.train_windows) < int(limit) // (int(cfg.data.seq_len) + 1):
        raise SystemExit(f"[sweep_v2] the training data hold {len(dm.train_windows)} windows, fewer than "
                         f"data.max_train_tokens={limit} needs ({int(limit) // (int(cfg.data.seq_len) + 1)}): "
                         "unpack the missing shards first (device.sh setup)")
    res = make_resources(dm)
    res.token_counts()
    for arm in arms:
        r = study_config(study, [f"arm_v2={arm}", *overrides]).router
        unit = {"FirstPieceVocabRouter": "first_piece", "PrefixVocabRouter": "prefix"}.get(
            str(r._target_).rsplit(".", 1)[-1])
        if unit:
            res.routing_vocab(unit, int(r.vocab_size), int(r.get("max_span_len", 1)),
                              SpanDef(str(r.spans), int(r.span_len)))


def check_dense(study: str, overrides: list[str]) -> None:
    """The dense control must have the active FFN width of top-2: one expert of 2 x the study model's width."""
    dense = study_config(study, ["arm_v2=dense", *overrides]).model
    topk = study_config(study, ["arm_v2=topk", *overrides]).model
    want = int(topk.hidden_dim) * int(topk.num_experts_per_tok)
    if int(dense.hidden_dim) != want:
        raise SystemExit(f"[sweep_v2] arm dense has model.hidden_dim={dense.hidden_dim}, but the study model's top-"
                         f"{topk.num_experts_per_tok} active width is {want}: set hidden_dim: {want} in "
                         f"{STUDY_CONF_DIR / 'arm_v2' / 'dense.yaml'}")


class Driver:
    """Resolves jobs to run dirs and commands, and runs them (``--parallel`` at once) in plan order."""

    def __init__(self, a: argparse.Namespace, overrides: list[str]) -> None:
        self.a, self.overrides = a, overrides
        self.t0 = time.monotonic()
        cfg = study_config(a.study, overrides)
        self.root = Path(str(cfg.study_root)).resolve()
        self.max_steps = {b: int(study_config(a.study, [f"budget={b}", *overrides]).trainer.max_steps)
                          for b in dict.fromkeys([*a.budgets, a.tune_budget])}
        self.default_lr = {arm: float(study_config(a.study, [f"arm_v2={arm}", *overrides]).optimizer.lr)
                           for arm in dict.fromkeys([*a.arms, REFERENCE])}
        self.data_args = [x for o in overrides if o.startswith("data.") for x in ("--data", o[len("data."):])]
        if a.gpu_ids is not None:
            self.gpu_ids = [g.strip() for g in a.gpu_ids.split(",") if g.strip()]
        elif a.gpus == "auto":
            import torch

            self.gpu_ids = [str(i) for i in range(torch.cuda.device_count())]
        else:
            self.gpu_ids = [str(i) for i in range(int(a.gpus))]

    # where each job writes
    def lr_of(self, j: Job) -> float | None:
        if j.lr is not None:
            return j.lr
        factors = self.a.lr_factors
        return best_lr(self.root, j.arm, [self.default_lr[j.arm] * f for f in factors], self.max_steps[j.budget],
                       j.seed)

    def run_dir(self, j: Job) -> Path | None:
        if j.stage == "grid":
            return self.root / f"{j.arm}-{j.budget}-s{j.seed}"
        lr = self.lr_of(j)
        return None if lr is None else self.root / "tune" / tune_name(j.arm, lr, j.knob, j.seed)

    def table(self, j: Job) -> Path:
        name = f"tune-topk-s{j.seed}" if j.stage == "tune" else f"topk-{j.budget}-s{j.seed}"
        return self.root / "distilled_hash" / f"{name}.pt"

    def done(self, j: Job) -> bool:
        if j.kind == "distill":
            return self.table(j).is_file()
        d = self.run_dir(j)
        return d is not None and finished(d, self.max_steps[j.budget])

    def command(self, j: Job, chosen: dict[str, dict[str, float]]) -> list[str]:
        if j.kind == "distill":
            src = self.run_dir(j) if j.stage == "grid" else self.root / "tune" / tune_name(REFERENCE, self.lr_of(j))
            return [sys.executable, str(HERE / "distill_hash.py"), "--ckpt", str(src), "--out", str(self.table(j)),
                    "--windows", str(self.a.distill_windows), *self.data_args]
        run = [f"arm_v2={j.arm}", f"budget={j.budget}", f"seed={j.seed}", "ckpt_path=last"]
        if j.arm == "hash_distilled":
            table = self.table(Job(j.stage, "distill", REFERENCE, j.budget, j.seed))
            run.append(f"router.table_path={table}")
        if j.stage == "tune":
            d = self.run_dir(j)
            run += [f"optimizer.lr={fmt(self.lr_of(j))}", f"name={d.name}", f"hydra.run.dir={d}"]
            if j.knob:
                run.append(f"{KNOB_KEYS[j.knob[0]]}={fmt(j.knob[1])}")
        else:
            run += [f"{k}={v}" for k, v in chosen.get(j.arm, {}).items()]
        return [sys.executable, "-m", "moe_variants.training.run",
                *study_overrides(self.a.study, [*run, *self.overrides])]

    def log_path(self, j: Job) -> Path:
        return self.root / "logs" / (j.key.replace(":", "-") + ".log")

    def run(self, jobs: list[Job], chosen: dict[str, dict[str, float]]) -> int:
        a = self.a
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        done = {j.key for j in jobs if self.done(j)}
        pending = [j for j in jobs if j.key not in done]
        print(f"[sweep_v2] {len(jobs)} jobs, {len(done)} already done, {len(pending)} to run; root {self.root}; "
              f"{a.parallel} at once over {len(self.gpu_ids)} GPU(s)", flush=True)
        failed, pending, stopped = run_jobs(
            jobs, done, command=lambda j: self.command(j, chosen), log_path=self.log_path, succeeded=self.done,
            parallel=a.parallel, gpu_ids=self.gpu_ids, t0=self.t0, launch_until=a.launch_until, tag="sweep_v2")
        if stopped and pending:
            return 3
        return 1 if failed or pending else 0


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", choices=("plan", "tune", "choose", "grid", "all"))
    p.add_argument("--study", default="router_study_v2")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    p.add_argument("--budgets", default=",".join(BUDGETS), help="grid budgets (conf/budget/), smallest first")
    p.add_argument("--seeds", default="0,1,2", help="grid seeds")
    p.add_argument("--tune-budget", default=BUDGETS[0])
    p.add_argument("--lr-factors", default=",".join(map(fmt, LR_FACTORS)),
                   help="the tuning lr grid, as factors of each arm's default lr")
    p.add_argument("--knobs", default=",".join(key for key, _, _ in TOPK_KNOBS),
                   help="topk's knobs to tune at its best lr (comma-separated; empty: none)")
    p.add_argument("--study-root", type=Path, help="override the study config's study_root")
    p.add_argument("--out", type=Path, help="results folder (tuning.csv, chosen.yaml, the report); "
                                            "default results/<study>")
    p.add_argument("--use-defaults", action="store_true", help="grid: run arms without chosen settings with their "
                                                               "arm file's defaults instead of refusing")
    p.add_argument("--parallel", type=int, default=1, help="jobs at once")
    p.add_argument("--gpus", default="auto", help="GPUs to spread jobs over (slot i uses GPU i %% n); 0 = none")
    p.add_argument("--gpu-ids", default=None, help="comma-separated GPU ids to use instead of 0..n-1")
    p.add_argument("--launch-until", type=float, default=None, help="seconds after which no new job starts")
    p.add_argument("--distill-windows", type=int, default=2048)
    p.add_argument("--no-prepare", action="store_true", help="skip the data check and cache build")
    p.add_argument("--no-analyze", action="store_true", help="all: skip analyze_v2.py at the end")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # moe-train overrides for every run come after --
    a = p.parse_args(argv[:cut])
    a.overrides = argv[cut + 1:]
    a.arms = [x for x in a.arms.split(",") if x]
    unknown = [x for x in a.arms if x not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; choices: {list(ARMS)}")
    a.budgets = [x for x in a.budgets.split(",") if x]
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.lr_factors = tuple(float(x) for x in a.lr_factors.split(",") if x.strip())
    a.knobs = tuple(x for x in a.knobs.split(",") if x)
    bad = [k for k in a.knobs if k not in KNOB_KEYS.values()]
    if bad:
        p.error(f"unknown knobs {bad}; choices: {list(KNOB_KEYS.values())}")
    a.out = a.out or Path("results") / a.study
    return a, list(a.overrides) + ([f"study_root={a.study_root}"] if a.study_root else [])


def main(argv: list[str] | None = None) -> int:
    a, overrides = parse(argv)
    d = Driver(a, overrides)
    tune = plan_tune(a.arms, d.default_lr, a.tune_budget, a.lr_factors, knobs=a.knobs)
    grid = plan_grid(a.arms, a.budgets, a.seeds)
    if a.stage == "plan":
        for j in [*tune, *grid]:
            print(j.key + (f"  after {', '.join(j.after)}" if j.after else ""))
        return 0
    if "dense" in a.arms and a.stage in ("tune", "grid", "all"):
        check_dense(a.study, overrides)
    if a.stage in ("tune", "grid", "all") and not a.no_prepare:
        prepare(a.study, a.arms, overrides)
        print(f"[sweep_v2] data checked, caches ready ({time.monotonic() - d.t0:.0f} s)", flush=True)
    chosen: dict[str, dict[str, float]] = {}
    if a.stage in ("tune", "all"):
        rc = d.run(tune, {})
        if rc != 0:
            return rc
    if a.stage in ("choose", "all"):
        chosen = choose(d.root, tune, d.max_steps[a.tune_budget], a.out)
        print(f"[sweep_v2] wrote {a.out / 'tuning.csv'} and {a.out / 'chosen.yaml'}")
    if a.stage in ("grid", "all"):
        chosen = chosen or read_chosen(a.out / "chosen.yaml")
        lacking = [arm for arm in a.arms if arm not in chosen]
        if lacking and not a.use_defaults:
            print(f"[sweep_v2] no chosen settings for {lacking} in {a.out / 'chosen.yaml'}: finish `sweep_v2.py "
                  "tune` and run `sweep_v2.py choose`, or pass --use-defaults", file=sys.stderr)
            return 1
        rc = d.run(grid, chosen)
        if rc != 0:
            return rc
        if a.stage == "all" and not a.no_analyze:
            cmd = [sys.executable, str(HERE / "analyze_v2.py"), "--study", a.study, "--study-root", str(d.root),
                   "--out", str(a.out), "--budgets", ",".join(a.budgets), "--arms", ",".join(a.arms),
                   "--seeds", ",".join(map(str, a.seeds)), "--tune-budget", a.tune_budget]
            return 1 if subprocess.call(cmd) else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
