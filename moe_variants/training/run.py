"""``moe-train``: the Hydra app. ``moe-train model=tiny router=hash seed=1``; sweeps: ``moe-train -m router=topk,hash
seed=0,1,2 experiment=<group>``; resume a run (or continue a sweep) with the same command plus ``ckpt_path=last``.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
import warnings
from typing import Any

import hydra
import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from moe_variants.paths import CONF_DIR
from moe_variants.training import naming  # noqa: F401  (registers the run-name resolver before Hydra needs it)
from moe_variants.training.build import Run, build
from moe_variants.training.checkpoint import NO_SPACE, NOT_WRITABLE
from moe_variants.training.console import log_through_root
from moe_variants.training.dashboard import report_to_wandb
from moe_variants.training.interrupt import Interrupted
from moe_variants.training.report import (
    make_report,
    train_token_counts,
    vocab_routing_shares,
    wandb_run_dir,
    write_report,
)
from moe_variants.training.throughput import Throughput

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one run from a composed config; returns the report (also written to the run dir)."""
    # lightning 2.6's pytree helper trips torch 2.13's LeafSpec deprecation on every fit; nothing to act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    log_through_root()  # one line per Lightning log event, also in the run's log file
    t0 = time.perf_counter()
    names_as_text(cfg)
    r = build(cfg)  # every check happens here, before the first step
    log.info("run dir %s; tags %s; params %s; resume from %s", r.run_dir, r.tags, r.model.num_params(), r.ckpt_path)
    exit_code = 1  # what W&B records unless the run completes
    md = None
    try:
        try:
            r.trainer.fit(r.lit, datamodule=r.datamodule, ckpt_path=r.ckpt_path)
        except Interrupted as stop:  # the first Ctrl-C: the step was finished and saved
            exit_code = 130  # the shell's code for SIGINT
            print(f"{stop}; resume with:\n  {resume_command(r.run_dir)}", file=sys.stderr, flush=True)
            raise
        except FloatingPointError:  # the NaN guard: nothing of the bad step was written
            cmd = resume_command(r.run_dir, "resume_allow_changes=[optimizer.lr]", "optimizer.lr=<lower>")
            print(f"NaN/inf: resume from the last good checkpoint with a lower LR:\n  {cmd}", file=sys.stderr)
            raise
        if r.lit.last_val_step != r.trainer.global_step:  # final validation, unless fit just ran it
            r.trainer.validate(r.lit, datamodule=r.datamodule, verbose=False)
        val = {k: float(v) for k, v in r.trainer.callback_metrics.items() if k.startswith("val/")}
        report: dict[str, Any] = {"val_loss": val.get("val/loss", math.nan)}
        if cfg.get("report", True) and r.trainer.is_global_zero:  # DDP: one report, from rank 0
            report = report_of(r, val, time.perf_counter() - t0)
            md = write_report(report, r.run_dir)
            report_to_wandb(r.trainer, report)
        exit_code = 0
    except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C: Lightning turns it into sys.exit(1)
        exit_code = 130
        raise
    finally:
        if r.lock is not None:
            r.lock.unlink(missing_ok=True)
        if wandb.run is not None:  # close the W&B run so the next run of a sweep (same process) gets its own
            wandb.finish(exit_code=exit_code)
    if md is not None:  # after W&B's closing summary, so that the run ends with where its outputs are
        print(md + f"- report: {r.run_dir / 'report.md'} (and report.json)", flush=True)
    return report


def report_of(r: Run, val: dict[str, float], wall_seconds: float) -> dict[str, Any]:
    """``report.make_report`` of a finished run, from the parts of the run it reports on."""
    throughput = next((cb for cb in r.trainer.callbacks if isinstance(cb, Throughput)), Throughput())  # or none
    ckpt_cb = r.trainer.checkpoint_callback
    return make_report(
        model=r.model, val_metrics=val,
        train_token_counts=train_token_counts(r.datamodule, r.model.args.vocab_size, r.resources),
        throughput=throughput.summary(), checkpoint_seconds=Throughput.checkpoint_seconds(r.trainer),
        wall_seconds=wall_seconds, routing_shares=vocab_routing_shares(r.model, r.datamodule),
        steps=r.trainer.global_step, name=r.config.get("name"),
        experiment=r.config.get("experiment"), tags=r.tags, run_dir=r.run_dir,
        checkpoint=(ckpt_cb.last_model_path or None) if ckpt_cb is not None else None,
        wandb_run_dir=wandb_run_dir(r.trainer),
    )


def names_as_text(cfg: DictConfig) -> None:
    """``name=7`` or ``name=nan`` parse as numbers; the run dir already used their text, so do W&B and the rest."""
    for key in ("name", "experiment"):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], str):
            cfg[key] = str(cfg[key])


def resume_command(run_dir: Any, *extra: str) -> str:
    """The ``moe-train`` command that resumes this run: its overrides (from Hydra; the run dir otherwise) with
    ``ckpt_path=last``."""
    if not HydraConfig.initialized():
        return shlex.join(["moe-train", f"hydra.run.dir={run_dir}", "ckpt_path=last", *extra])
    hc = HydraConfig.get()
    task = [o for o in hc.overrides.task if not o.split("=", 1)[0].lstrip("+~").startswith("ckpt_path")]
    where = [f"hydra.run.dir={run_dir}"] if hc.mode == RunMode.MULTIRUN or any(
        o.startswith(("hydra.run.dir", "hydra.sweep")) for o in hc.overrides.hydra) else []
    return shlex.join(["moe-train", *task, *where, "ckpt_path=last", *extra])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns the final validation loss (what a Hydra sweeper would minimise)."""
    try:
        return float(run(cfg)["val_loss"])
    except Interrupted:
        sys.exit(130)  # stops a sweep too; the resume command is printed
    except OSError as e:
        if e.errno not in NO_SPACE + NOT_WRITABLE:
            raise
        print(f"moe-train: {e}", file=sys.stderr)  # one line naming the path (checkpoint.write_error)
        sys.exit(1)


if __name__ == "__main__":
    main()
