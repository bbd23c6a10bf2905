"""Distil a token-id hash table from a trained top-k checkpoint: for every layer, each token id's most frequent
experts (top-K set membership) over a bounded number of training windows.

    python experiments/router_study/distill_hash.py --ckpt runs/router_study/topk-s0 \\
        --out runs/router_study/distilled_hash/topk-s0.pt
    python experiments/router_study/distill_hash.py --study router_study --seeds 0,1,2   # the study's layout

Writes a (n_layers, V, K) int64 tensor (``router.table=file router.table_path=<it>``, layer i reads row i) and
``<out>.json`` beside it: source checkpoint and step, windows and tokens read, vocabulary coverage, and per layer
how often the table's experts match what the top-k router chose on those same tokens (its in-sample fit).
Token ids never seen get the globally most used experts (``analysis.best_token_expert_table``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import OnDevice, datamodule_for, distilled_table_path, pick_device, study_root  # noqa: E402

from moe_variants.analysis import best_token_expert_table  # noqa: E402
from moe_variants.training.build import load_model  # noqa: E402
from moe_variants.training.checkpoint import read_checkpoint, save_atomic  # noqa: E402


@torch.no_grad()
def distill(ckpt: Path, out: Path, windows: int = 2048, batch_size: int = 16, device: str = "auto",
            data_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the distilled table of ``ckpt`` (a .ckpt or run dir) to ``out``; return its provenance."""
    t0 = time.perf_counter()
    model, cfg = load_model(ckpt)
    E, K, V = model.args.num_experts, model.args.num_experts_per_tok, model.args.vocab_size
    dm = datamodule_for(cfg, **(data_overrides or {}))
    if dm.vocab_size != V:
        raise ValueError(f"the run's tokenizer has {dm.vocab_size} tokens, the model {V}")
    train = dm.train_windows
    n = min(windows, len(train))
    index = torch.linspace(0, len(train) - 1, n).round().long().unique().tolist()  # evenly over the whole split
    runner = OnDevice(model, pick_device(device))
    token_ids, experts = [], [[] for _ in model.layers]
    for i in range(0, len(index), batch_size):
        batch = default_collate([train[j] for j in index[i:i + batch_size]])
        routing = runner(batch["input_ids"]).routing
        token_ids.append(batch["input_ids"])
        for layer, r in enumerate(routing):
            experts[layer].append(r.expert_ids)
    ids = torch.cat(token_ids)  # (N, S)
    tables, fit = [], []
    for layer_experts in experts:
        eids = torch.cat(layer_experts)  # (N, S, K)
        table = best_token_expert_table(eids, ids, V, top_k=K, num_experts=E)  # (V, K)
        tables.append(table)
        # share of the router's (token, expert) choices that the table reproduces on these tokens
        chosen = table[ids]  # (N, S, K)
        fit.append(float((chosen.unsqueeze(-1) == eids.unsqueeze(-2)).any(-1).float().mean()))
    stacked = torch.stack(tables).long().contiguous()  # (n_layers, V, K)
    save_atomic(stacked, out)
    info = {
        "source_checkpoint": str(ckpt), "source_step": int(read_checkpoint(ckpt).get("global_step", -1)),
        "source_router": model.routers[0].describe(), "shape": list(stacked.shape),
        "windows": len(index), "tokens": int(ids.numel()), "vocab_seen": int(ids.unique().numel()),
        "vocab_seen_share": float(ids.unique().numel() / V), "top_k_counted": K,
        "table_matches_router_per_layer": fit, "seconds": time.perf_counter() - t0,
    }
    out.with_suffix(out.suffix + ".json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="a trained top-k checkpoint (.ckpt or run dir)")
    p.add_argument("--out", type=Path, help="the .pt table to write (with --ckpt)")
    p.add_argument("--study", help="instead: the study config (router_study, router_study_smoke); distils "
                                   "<study_root>/topk-s<seed> into <study_root>/distilled_hash/topk-s<seed>.pt")
    p.add_argument("--seeds", default="0,1,2", help="with --study: comma-separated seeds")
    p.add_argument("--study-root", type=Path, help="with --study: override the study's run root")
    p.add_argument("--windows", type=int, default=2048, help="training windows to read (evenly spaced)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--force", action="store_true", help="rewrite tables that exist")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's data config, e.g. --data corpus_dir=/path (repeatable)")
    a = p.parse_args(argv)
    data = dict(kv.split("=", 1) for kv in a.data)
    if a.study:
        root = a.study_root or study_root(a.study)
        jobs = [(root / f"topk-s{s}", distilled_table_path(root, int(s))) for s in a.seeds.split(",") if s.strip()]
    elif a.ckpt and a.out:
        jobs = [(a.ckpt, a.out)]
    else:
        p.error("give --ckpt and --out, or --study")
    for ckpt, out in jobs:
        if out.is_file() and not a.force:
            print(f"{out} exists (--force rewrites it)")
            continue
        info = distill(ckpt, out, a.windows, a.batch_size, a.device, data)
        print(f"wrote {out} {tuple(info['shape'])} from {ckpt} (step {info['source_step']}): {info['tokens']} tokens, "
              f"{100 * info['vocab_seen_share']:.1f}% of the vocabulary seen; table matches the router on "
              + ", ".join(f"{100 * f:.0f}%" for f in info["table_matches_router_per_layer"]) + " of its choices")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
