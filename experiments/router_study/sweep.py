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
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _study import ARMS, distilled_table_path, study_config, study_overrides  # noqa: E402


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
    n_gpus = len(gpu_ids)
    (root / "logs").mkdir(parents=True, exist_ok=True)

    jobs = plan(arms, seeds)
    done = {j.key for j in jobs if j.kind == "train" and finished(root, j.arm, j.seed, max_steps)}
    done |= {j.key for j in jobs if j.kind == "distill" and distilled_table_path(root, j.seed).is_file()}
    pending = [j for j in jobs if j.key not in done]
    print(f"[sweep] {a.study}: {len(jobs)} jobs, {len(done)} already done, {len(pending)} to run; root {root}; "
          f"{a.parallel} at once over {n_gpus} GPU(s)", flush=True)
    if pending and not a.no_prepare:
        prepare(a.study, overrides)
        print(f"[sweep] data caches ready ({time.monotonic() - t0:.0f} s)", flush=True)

    def command(j: Job) -> list[str]:
        if j.kind == "distill":
            return [sys.executable, str(HERE / "distill_hash.py"), "--ckpt", str(root / f"topk-s{j.seed}"), "--out",
                    str(distilled_table_path(root, j.seed)), "--windows", str(a.distill_windows), *data_args]
        return [sys.executable, "-m", "moe_variants.training.run",
                *study_overrides(a.study, [f"arm={j.arm}", f"seed={j.seed}", "ckpt_path=last", *overrides])]

    running: dict[int, tuple[subprocess.Popen, Job, float]] = {}
    failed: list[str] = []
    stopped = False
    while pending or running:
        for slot in range(a.parallel):
            if slot in running:
                continue
            if a.launch_until is not None and time.monotonic() - t0 > a.launch_until:
                stopped = True
                break
            ready = [j for j in pending if all(k in done for k in j.after)]
            if not ready:
                break
            j = ready[0]
            pending.remove(j)
            env = dict(os.environ)
            if n_gpus > 0:
                env["CUDA_VISIBLE_DEVICES"] = gpu_ids[slot % n_gpus]
            log = open(root / "logs" / f"{j.kind}-{j.arm}-s{j.seed}.log", "a")
            running[slot] = (subprocess.Popen(command(j), stdout=log, stderr=subprocess.STDOUT, env=env), j,
                             time.monotonic())
            log.close()
            print(f"[sweep] start {j.key} (slot {slot}{f', GPU {gpu_ids[slot % n_gpus]}' if n_gpus else ''})",
                  flush=True)
        for slot, (proc, j, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[slot]
            ok = proc.returncode == 0 and (j.kind != "train" or finished(root, j.arm, j.seed, max_steps))
            print(f"[sweep] {'done' if ok else 'FAILED'} {j.key} in {time.monotonic() - start:.0f} s "
                  f"(rc {proc.returncode}; log {root / 'logs' / f'{j.kind}-{j.arm}-s{j.seed}.log'})", flush=True)
            (done.add if ok else failed.append)(j.key)
        # jobs whose prerequisites failed can never run
        blocked = [j for j in pending if any(k in failed for k in j.after)]
        for j in blocked:
            pending.remove(j)
            failed.append(j.key + " (blocked)")
        if stopped and not running:
            break
        if pending and not running and not stopped and not any(all(k in done for k in j.after) for j in pending):
            break  # nothing can ever become ready
        time.sleep(0.5)
    print(f"[sweep] {len(done)} of {len(jobs)} jobs done in {time.monotonic() - t0:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if stopped and pending:
        print(f"[sweep] stopped launching after {a.launch_until} s; {len(pending)} jobs left: run the same command "
              f"again", flush=True)
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
