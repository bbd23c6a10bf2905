"""``moe-train``: the Hydra app. ``moe-train model=tiny router=hash seed=1``; sweeps: ``moe-train -m router=topk,hash
seed=0,1,2 experiment=<group>``; resume a run (or continue a sweep) with the same command plus ``ckpt_path=last``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # the repo's conf/ (editable install)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one run from a composed config; returns the report (also written to the run dir)."""
    from moe_variants.build import build
    from moe_variants.report import make_report, write_report

    # lightning 2.6 on torch 2.13 warns on every fit (ENVIRONMENT.md §1); nothing to act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    # the data module resumes its stream from trainer.global_step itself (its documented contract)
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
    t0 = time.perf_counter()
    r = build(cfg)  # every check happens here, before the first step
    log.info("run dir %s; tags %s; params %s; resume from %s", r.run_dir, r.tags, r.model.num_params(), r.ckpt_path)
    md = None
    try:
        r.trainer.fit(r.lit, datamodule=r.datamodule, ckpt_path=r.ckpt_path)
        if r.lit.last_val_step != r.trainer.global_step:  # final validation, unless fit just ran it
            r.trainer.validate(r.lit, datamodule=r.datamodule, verbose=False)
        val = {k: float(v) for k, v in r.trainer.callback_metrics.items() if k.startswith("val/")}
        report: dict[str, Any] = {"val_loss": val.get("val/loss", math.nan)}
        if cfg.get("report", True) and r.trainer.is_global_zero:  # DDP: one report, from rank 0
            report = make_report(r, val, time.perf_counter() - t0)
            md = write_report(report, r.run_dir)
    finally:
        if r.lock is not None:
            r.lock.unlink(missing_ok=True)
        for lg in r.trainer.loggers:  # close the W&B run so the next run of a sweep (same process) gets its own
            if type(lg).__name__ == "WandbLogger" and lg._experiment is not None:
                lg.experiment.finish()
    if md is not None:  # after W&B's closing summary, so that the run ends with where its outputs are
        print(md + f"- report: {r.run_dir / 'report.md'} (and report.json)", flush=True)
    return report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns the final validation loss (what a Hydra sweeper would minimise)."""
    return float(run(cfg)["val_loss"])


if __name__ == "__main__":
    main()
