"""Glue shared by the router study's scripts (sweep.py, distill_hash.py, analyze.py): the study's composed config,
its runs on disk, a run's data module, and running a CPU-loaded checkpoint on another device."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from moe_variants.paths import REPO_ROOT

ARMS = ("topk", "hash_random", "hash_balanced", "span_head", "span_first_piece", "span_prefix", "hash_distilled")
RUN_DIR = re.compile(r"^(?P<arm>[a-z][a-z0-9_]*)-s(?P<seed>\d+)$")  # <arm>-s<seed>, the study's run-dir names
CONF_DIR = REPO_ROOT / "conf"  # the framework's configs (moe-train's config.yaml)
STUDY_CONF_DIR = Path(__file__).resolve().parent / "conf"  # the study's own groups: study/ and arm/


def study_overrides(study: str, overrides: list[str] = ()) -> list[str]:
    """``+study=<study>`` and the overrides, with the study's config folder on Hydra's search path. Hydra keeps
    only the first ``hydra.searchpath=`` it is given, so a search path among the overrides is merged into it."""
    paths = [f"file://{STUDY_CONF_DIR}"]
    rest = []
    for o in overrides:
        if o.startswith("hydra.searchpath="):
            paths += [x.strip() for x in o.split("=", 1)[1].strip().strip("[]").split(",") if x.strip()]
        else:
            rest.append(o)
    return [f"hydra.searchpath=[{','.join(paths)}]", f"+study={study}", *rest]


def study_config(study: str, overrides: list[str] = ()) -> Any:
    """The composed config of ``+study=<study>`` (plus overrides), unresolved (``name`` needs a Hydra runtime)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=study_overrides(study, overrides))


def study_root(study: str, overrides: list[str] = ()) -> Path:
    root = Path(str(study_config(study, overrides).study_root))
    return root if root.is_absolute() else Path.cwd() / root


def distilled_table_path(root: Path, seed: int) -> Path:
    """Where distill_hash.py writes the table of ``topk-s<seed>`` (conf/arm/hash_distilled.yaml reads it)."""
    return root / "distilled_hash" / f"topk-s{seed}.pt"


@dataclass
class RunInfo:
    arm: str
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    def report(self) -> dict[str, Any] | None:
        """The run's report.json (written by moe-train when the run finished), or None."""
        p = self.run_dir / "report.json"
        return json.loads(p.read_text()) if p.is_file() else None


def find_runs(root: Path) -> list[RunInfo]:
    """Every ``<arm>-s<seed>/`` folder under the study root, sorted by arm (study order first) then seed."""
    runs = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        m = RUN_DIR.match(d.name)
        if d.is_dir() and m:
            runs.append(RunInfo(m["arm"], int(m["seed"]), d))
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(runs, key=lambda r: (order.get(r.arm, len(order)), r.arm, r.seed))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def datamodule_for(cfg: Any, **overrides: Any) -> Any:
    """The run's own data module (its saved ``data`` config), with ``overrides``; set up."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.update(overrides)
    dm = instantiate(data)
    dm.setup("fit")
    return dm


class OnDevice:
    """Runs a model on ``device`` while the caller feeds CPU batches and reads CPU routing outputs, so that
    ``moe_variants.analysis.analyze.collect`` and the metric functions work unchanged on a GPU."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model.to(device), device
        self.layers = model.layers

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        to = (lambda t: None if t is None else t.to(self.device))  # noqa: E731
        out = self.model(to(input_ids), labels=to(labels))
        routing = [SimpleNamespace(expert_ids=r.expert_ids.cpu(),
                                   logits=None if r.logits is None else r.logits.float().cpu(),
                                   dropped=None if r.dropped is None else r.dropped.cpu()) for r in out.routing]
        loss = None if out.lm_loss is None else out.lm_loss.float().cpu()
        return SimpleNamespace(lm_loss=loss, routing=routing)


def run_jobs(jobs: list[Any], done: set[str], *, command: Callable[[Any], list[str]], log_path: Callable[[Any], Path],
             succeeded: Callable[[Any], bool], parallel: int, gpu_ids: list[str], t0: float,
             launch_until: float | None = None, tag: str = "sweep") -> tuple[list[str], list[Any], bool]:
    """Run ``jobs`` (each with ``.key`` and ``.after``, the keys it needs first) in order, ``parallel`` at once as
    subprocesses (slot i on GPU ``gpu_ids[i % n]``), skipping keys in ``done`` and adding to it the ones that
    succeed (exit 0 and ``succeeded(job)``). A job found done when its turn comes (``succeeded`` is true before
    it runs) is not run again. No job starts ``launch_until`` seconds after ``t0``; a job whose prerequisite
    failed is dropped as blocked. Returns (failed keys, jobs never started, whether launching was stopped)."""
    pending = [j for j in jobs if j.key not in done]
    running: dict[int, tuple[subprocess.Popen, Any, float]] = {}
    failed: list[str] = []
    stopped = False
    while pending or running:
        for slot in range(parallel):
            if slot in running:
                continue
            if launch_until is not None and time.monotonic() - t0 > launch_until:
                stopped = True
                break
            ready = [j for j in pending if all(k in done for k in j.after)]
            if not ready:
                break
            j = ready[0]
            pending.remove(j)
            if succeeded(j):  # e.g. a run whose name resolved to one that already finished
                done.add(j.key)
                continue
            env = dict(os.environ)
            gpu = gpu_ids[slot % len(gpu_ids)] if gpu_ids else None
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            log_path(j).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path(j), "a") as log:
                proc = subprocess.Popen(command(j), stdout=log, stderr=subprocess.STDOUT, env=env)
            running[slot] = (proc, j, time.monotonic())
            print(f"[{tag}] start {j.key} (slot {slot}{f', GPU {gpu}' if gpu is not None else ''})", flush=True)
        for slot, (proc, j, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[slot]
            ok = proc.returncode == 0 and succeeded(j)
            print(f"[{tag}] {'done' if ok else 'FAILED'} {j.key} in {time.monotonic() - start:.0f} s "
                  f"(rc {proc.returncode}; log {log_path(j)})", flush=True)
            (done.add if ok else failed.append)(j.key)
        for j in [j for j in pending if any(k in failed or k + " (blocked)" in failed for k in j.after)]:
            pending.remove(j)  # a prerequisite failed: it can never run
            failed.append(j.key + " (blocked)")
        if stopped and not running:
            break
        if pending and not running and not any(all(k in done for k in j.after) for j in pending):
            break  # nothing can ever become ready
        time.sleep(0.5)
    print(f"[{tag}] {len(done)} of {len(jobs)} jobs done in {time.monotonic() - t0:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if stopped and pending:
        print(f"[{tag}] stopped launching after {launch_until} s; {len(pending)} jobs left: run the same command "
              "again", flush=True)
    return failed, pending, stopped
