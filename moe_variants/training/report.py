"""The end-of-run report (``report.md`` + ``report.json`` in the run dir): validation loss per domain against the
corpus unigram entropy, throughput, what routed the tokens of a routing-vocabulary router, where the W&B run and
the checkpoint are."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from moe_variants.routers.resources import count_tokens


def unigram_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats/token) of the unigram distribution given by token ``counts`` (V,): the loss of the best model
    that ignores context. A language model that has learned anything beyond token frequencies beats it."""
    p = counts.double() / counts.sum()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def train_token_counts(datamodule: Any, vocab_size: int, resources: Any = None) -> torch.Tensor:
    """(V,) token counts of the training split (shared with the routers' resources when they have them)."""
    if resources is not None:
        return resources.token_counts()
    return count_tokens(datamodule.train_token_chunks(), vocab_size)


def routing_shares(model: Any, datamodule: Any, batches_per_domain: int = 4) -> dict[str, float] | None:
    """For a routing-vocabulary router: the share of validation tokens routed by a vocabulary entry, by a hashed
    bucket and by the learned gate (first batches of every domain; the vocabulary is the same in every layer).
    None for routers without a vocabulary."""
    router = next((r for r in model.routers if hasattr(r, "routing_shares")), None)
    if router is None:
        return None
    loaders = datamodule.val_dataloader()
    ids = [b["input_ids"] for loader in (loaders if isinstance(loaders, list) else [loaders])
           for _, b in zip(range(batches_per_domain), loader)]
    return router.routing_shares(torch.cat(ids)) if ids else None


def wandb_run_dir(trainer: Any) -> str | None:
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            return str(Path(lg.experiment.dir).parent)  # .../wandb/offline-run-<time>-<id>
    return None


def make_report(run: Any, val_metrics: dict[str, float], wall_seconds: float) -> dict[str, Any]:
    """Collect the report of a finished ``build.Run``."""
    trainer, model = run.trainer, run.model
    counts = train_token_counts(run.datamodule, model.args.vocab_size, run.resources)
    h_unigram = unigram_entropy(counts)
    val_loss = val_metrics.get("val/loss", math.nan)
    throughput = next((cb for cb in trainer.callbacks if type(cb).__name__ == "Throughput"), None)
    ckpt_cb = trainer.checkpoint_callback
    return {
        "name": run.config.get("name"),
        "experiment": run.config.get("experiment"),
        "tags": run.tags,
        "causal": model.causal,
        "routers": sorted({r.describe() for r in model.routers}),
        "params": model.num_params(),
        "steps": trainer.global_step,
        "val_loss": val_loss,
        "val_loss_per_domain": {
            k[len("val/"): -len("/loss")]: v for k, v in sorted(val_metrics.items())
            if k.startswith("val/") and k.endswith("/loss") and k != "val/loss"
        },
        "unigram_entropy": h_unigram,
        "train_tokens_counted": int(counts.sum()),
        "beats_unigram": bool(val_loss < h_unigram),
        "routing_shares": routing_shares(model, run.datamodule),
        "train_tokens": getattr(throughput, "tokens", None),
        "tokens_per_s": getattr(throughput, "tokens_per_s", None),
        "train_seconds": getattr(throughput, "train_seconds", None),
        "wall_seconds": wall_seconds,
        "wandb_run_dir": wandb_run_dir(trainer),
        "checkpoint": (ckpt_cb.last_model_path or None) if ckpt_cb is not None else None,
        "run_dir": str(run.run_dir),
    }


def write_report(report: dict[str, Any], run_dir: Path) -> str:
    """Write ``report.json`` and ``report.md``; return the markdown."""
    r = report
    lines = [
        f"# Run report: {r['name']} (experiment {r['experiment']})",
        "",
        f"- routers: {', '.join(r['routers'])}; tags: {', '.join(r['tags'])}; causal: {r['causal']}",
        f"- parameters: {r['params']['total'] / 1e6:.2f}M total, {r['params']['active'] / 1e6:.2f}M active",
        f"- steps: {r['steps']}; training tokens: {r['train_tokens']}; "
        f"throughput: {r['tokens_per_s']:.0f} tokens/s (training steps only); wall time: {r['wall_seconds']:.0f} s",
        "",
        "| domain | val loss (nats/token) |",
        "|---|---|",
        *[f"| {d} | {v:.4f} |" for d, v in r["val_loss_per_domain"].items()],
        f"| **all (token-weighted)** | **{r['val_loss']:.4f}** |",
        "",
        f"Corpus unigram entropy (train split, {r['train_tokens_counted']} tokens): {r['unigram_entropy']:.4f} "
        f"nats/token. The model {'beats' if r['beats_unigram'] else 'does NOT beat'} it "
        f"({r['val_loss'] - r['unigram_entropy']:+.4f}).",
        "",
        *([f"Routing-vocabulary router, validation tokens routed by: a vocabulary entry "
           f"{100 * r['routing_shares']['vocab']:.1f}%, a hashed bucket {100 * r['routing_shares']['bucket']:.1f}%, "
           f"the learned gate {100 * r['routing_shares']['learned']:.1f}%.", ""] if r.get("routing_shares") else []),
        f"- W&B run: {r['wandb_run_dir']} (to upload an offline run: `wandb sync {r['wandb_run_dir']}`)"
        if r["wandb_run_dir"] else "- W&B run: none (no W&B logger)",
        f"- checkpoint: {r['checkpoint']}",
    ]
    md = "\n".join(lines) + "\n"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(r, indent=2, default=str))
    (run_dir / "report.md").write_text(md)
    return md
