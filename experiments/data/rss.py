"""Peak resident memory of a short training run on a fraction of the large corpus and on all of it.

The fraction is a view of the corpus: the same index, validation streams and the first ceil(f * n) training
shards (symlinks), read with data.allow_partial=true, exactly as a machine that has received only those shards.

    python experiments/data/rss.py --corpus data/corpus_large --fractions 0.1,1.0 --steps 30 --out /tmp/rss
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path


def view(corpus: Path, fraction: float, out: Path) -> Path:
    index = json.loads((corpus / "index.json").read_text())
    n = max(1, math.ceil(fraction * len(index["train"])))
    dest = out / f"view-{fraction:g}"
    (dest / "train").mkdir(parents=True, exist_ok=True)
    for name in ("index.json", "manifest.json", "validation"):
        if not (dest / name).exists():
            (dest / name).symlink_to((corpus / name).resolve())
    for s in index["train"][:n]:
        for ext in (".tokens", ".docs.npy"):
            link = dest / "train" / (s["name"] + ext)
            if not link.exists():
                link.symlink_to((corpus / "train" / (s["name"] + ext)).resolve())
    return dest


def run(corpus: Path, steps: int, out: Path, tag: str) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "moe_variants.train", "model=tiny", "data=large",
           f"data.corpus_dir={corpus}", "data.allow_partial=true", "data.seq_len=256", "data.batch_size=8",
           "data.val_sequences_per_domain=4", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
           "trainer.val_check_interval=1000", "trainer.enable_progress_bar=false", "logger=csv",
           "experiment=rss", f"hydra.run.dir={out / ('run-' + tag)}", "scheduler.warmup_steps=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", res.stderr).group(1)
    report = json.loads((out / f"run-{tag}" / "report.json").read_text())
    return {"max_rss_mib": round(rss / 1024, 1), "wall": wall, "train_tokens_counted": report["train_tokens_counted"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--fractions", default="0.1,1.0")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("/tmp/rss"))
    a = p.parse_args()
    rows = {}
    for f in (float(x) for x in a.fractions.split(",")):
        rows[f] = run(view(a.corpus.resolve(), f, a.out), a.steps, a.out, f"{f:g}")
        print(f"fraction {f:g}: {rows[f]}", flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
