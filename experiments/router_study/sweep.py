"""Run the whole router study in order, skipping finished runs and resuming unfinished ones (``ckpt_path=last``):
every arm x seed, then per seed the distilled table from ``topk-s<seed>`` and the ``hash_distilled`` run, then the
report (analyze.py).

    python experiments/router_study/sweep.py --study router_study                       # one GPU, one run at a time
    python experiments/router_study/sweep.py --study router_study --parallel 4 --gpus 2 # 2 runs per GPU, 2 GPUs
    python experiments/router_study/sweep.py --study router_study_smoke --arms topk,hash_distilled --seeds 0
    python experiments/router_study/sweep.py --study router_study -- logger=csv        # extra moe-train overrides

A run is finished when its report.json says it reached the study's ``trainer.max_steps``. Each run's output goes
to ``<study_root>/logs/<arm>-s<seed>.log``. Data caches (tokenised corpus, token counts, routing vocabulary) are
built once before parallel runs start. Exit status: 0 all done, 1 a job failed, 3 stopped launching at
``--launch-until`` (run the same command again to continue).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _study import ARMS, distilled_table_path, run_jobs, study_config, study_overrides  # noqa: E402


@dataclass
class Job:
    kind: str  # train | distill
    arm: str
    seed: int
    after: list[str] = field(default_factory=list)  # job keys that must succeed first

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.arm}-s{self.seed}"


def plan(arms: list[str], seeds: list[int]) -> list[Job]:
    jobs = [Job("train", arm, s) for arm in arms if arm != "hash_distilled" for s in seeds]
    if "hash_distilled" in arms:
        for s in seeds:
            jobs.append(Job("distill", "topk", s, after=[f"train:topk-s{s}"]))
            jobs.append(Job("train", "hash_distilled", s, after=[f"distill:topk-s{s}"]))
    return jobs


def finished(root: Path, arm: str, seed: int, max_steps: int) -> bool:
    p = root / f"{arm}-s{seed}" / "report.json"
    return p.is_file() and int(json.loads(p.read_text()).get("steps") or 0) >= max_steps


def prepare(study: str, overrides: list[str]) -> None:
    """Tokenise the corpus and build the routers' corpus statistics once (cached on disk), so that parallel runs
    only read the caches."""
    from hydra.utils import instantiate

    from moe_variants.routers.spans import SpanDef
    from moe_variants.training.build import make_resources

    cfg = study_config(study, overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    res = make_resources(dm)
    res.token_counts()
    for arm, unit in (("span_first_piece", "first_piece"), ("span_prefix", "prefix")):
        r = study_config(study, [f"arm={arm}", *overrides]).router
        span = SpanDef(str(r.spans), int(r.span_len))
        res.routing_vocab(unit, int(r.vocab_size), int(r.get("max_span_len", 1)), span)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--study", default="router_study")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--study-root", type=Path, help="override the study config's study_root")
    p.add_argument("--out", type=Path, help="report folder (default results/<study>)")
    p.add_argument("--parallel", type=int, default=1, help="jobs at once")
    p.add_argument("--gpus", default="auto", help="GPUs to spread jobs over (job slot i uses GPU i %% n); 0 = none")
    p.add_argument("--gpu-ids", default=None,
                   help="comma-separated GPU ids to use instead of 0..n-1 (e.g. 1: leave GPU 0 to other work)")
    p.add_argument("--launch-until", type=float, default=None, help="seconds after which no new job starts")
    p.add_argument("--distill-windows", type=int, default=2048)
    p.add_argument("--no-prepare", action="store_true", help="skip building the data caches first")
    p.add_argument("--no-analyze", action="store_true")
    p.add_argument("overrides", nargs="*", help="moe-train overrides for every run (after --)")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    arms = [x for x in a.arms.split(",") if x]
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; choices: {list(ARMS)}")
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    overrides = list(a.overrides) + ([f"study_root={a.study_root}"] if a.study_root else [])
    cfg = study_config(a.study, overrides)
    max_steps, root = int(cfg.trainer.max_steps), Path(str(cfg.study_root))
    data_args = [x for o in overrides if o.startswith("data.") for x in ("--data", o[len("data."):])]
    if a.gpu_ids is not None:
        gpu_ids = [g.strip() for g in a.gpu_ids.split(",") if g.strip()]
    elif a.gpus == "auto":
        import torch

        gpu_ids = [str(i) for i in range(torch.cuda.device_count())]
    else:
        gpu_ids = [str(i) for i in range(int(a.gpus))]
    (root / "logs").mkdir(parents=True, exist_ok=True)

    def succeeded(j: Job) -> bool:
        if j.kind == "distill":
            return distilled_table_path(root, j.seed).is_file()
        return finished(root, j.arm, j.seed, max_steps)

    jobs = plan(arms, seeds)
    done = {j.key for j in jobs if succeeded(j)}
    print(f"[sweep] {a.study}: {len(jobs)} jobs, {len(done)} already done, {len(jobs) - len(done)} to run; root "
          f"{root}; {a.parallel} at once over {len(gpu_ids)} GPU(s)", flush=True)
    if len(done) < len(jobs) and not a.no_prepare:
        prepare(a.study, overrides)
        print(f"[sweep] data caches ready ({time.monotonic() - t0:.0f} s)", flush=True)

    def command(j: Job) -> list[str]:
        if j.kind == "distill":
            return [sys.executable, str(HERE / "distill_hash.py"), "--ckpt", str(root / f"topk-s{j.seed}"), "--out",
                    str(distilled_table_path(root, j.seed)), "--windows", str(a.distill_windows), *data_args]
        return [sys.executable, "-m", "moe_variants.training.run",
                *study_overrides(a.study, [f"arm={j.arm}", f"seed={j.seed}", "ckpt_path=last", *overrides])]

    def log_path(j: Job) -> Path:
        return root / "logs" / f"{j.kind}-{j.arm}-s{j.seed}.log"

    failed, pending, stopped = run_jobs(jobs, done, command=command, log_path=log_path, succeeded=succeeded,
                                        parallel=a.parallel, gpu_ids=gpu_ids, t0=t0, launch_until=a.launch_until)
    if stopped and pending:
        return 3
    if not a.no_analyze:
        cmd = [sys.executable, str(HERE / "analyze.py"), "--study", a.study, "--study-root", str(root), *data_args]
        if a.out:
            cmd += ["--out", str(a.out)]
        rc = subprocess.call(cmd)
        if rc != 0:
            return 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
