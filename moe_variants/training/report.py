"""The end-of-run report (``report.md`` + ``report.json`` in the run dir): validation loss per domain against the
corpus unigram entropy, steady-state throughput and MFU, where the time went, what routed the tokens of a
routing-vocabulary router, where the W&B run and the checkpoint are. It is handed what it reports, nothing more."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from moe_variants.model.transformer import Transformer
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


def vocab_routing_shares(model: Any, datamodule: Any, batches_per_domain: int = 4) -> dict[str, float] | None:
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


def make_report(
    *,
    model: Transformer,
    val_metrics: dict[str, float],
    train_token_counts: torch.Tensor,
    throughput: dict[str, Any],
    checkpoint_seconds: float,
    wall_seconds: float,
    routing_shares: dict[str, float] | None = None,
    steps: int,
    name: str | None,
    experiment: str | None,
    tags: list[str],
    run_dir: Path,
    checkpoint: str | None,
    wandb_run_dir: str | None,
) -> dict[str, Any]:
    """The report of a finished run.

    Args:
        val_metrics: ``val/<domain>/loss`` and ``val/loss`` (token-weighted over all domains).
        train_token_counts: (V,) token counts of the training split (:func:`train_token_counts`).
        throughput: ``throughput.Throughput.summary()``: steady-state tokens/s and MFU, training clock split.
        checkpoint_seconds: time spent writing checkpoints; wall_seconds: the whole run, set-up included.
    """
    h_unigram = unigram_entropy(train_token_counts)
    val_loss = val_metrics.get("val/loss", math.nan)
    t = throughput
    time_split = {
        "compile_warmup": t["compile_warmup_seconds"],
        "training": t["train_seconds"] - t["compile_warmup_seconds"],
        "validation": t["validation_seconds"],
        "checkpointing": checkpoint_seconds,
    }
    time_split["other"] = wall_seconds - sum(time_split.values())  # set-up, data, model build, loggers, report
    return {
        "name": name,
        "experiment": experiment,
        "tags": tags,
        "causal": model.causal,
        "routers": sorted({r.describe() for r in model.routers}),
        "params": model.num_params(),
        "steps": steps,
        "val_loss": val_loss,
        "val_loss_per_domain": {
            k[len("val/"): -len("/loss")]: v for k, v in sorted(val_metrics.items())
            if k.startswith("val/") and k.endswith("/loss") and k != "val/loss"
        },
        "unigram_entropy": h_unigram,
        "train_tokens_counted": int(train_token_counts.sum()),
        "beats_unigram": bool(val_loss < h_unigram),
        "routing_shares": routing_shares,
        "train_tokens": t["tokens"],
        "tokens_per_s": t["tokens_per_s"],  # steady state: see "throughput"
        "mfu": t["mfu"],
        "peak_memory_gib": t["peak_memory_gib"],
        "throughput": t,
        "train_seconds": t["train_seconds"],
        "wall_seconds": wall_seconds,
        "time_seconds": time_split,
        "wandb_run_dir": wandb_run_dir,
        "checkpoint": checkpoint,
        "run_dir": str(run_dir),
    }


def throughput_lines(r: dict[str, Any]) -> list[str]:
    """The report's speed and time lines: what the steady-state number is, MFU, memory, where the time went."""
    t = r["throughput"]
    if t["steady"]:
        how = (f"steady state: median of the {t['steady_windows']} logged windows of {t['window_steps']} steps "
               f"after the first (compile and warm-up excluded)")
    else:
        how = "mean over all training steps, compile and warm-up INCLUDED (fewer than 2 full logged windows)"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no known peak FLOP/s for this device)"
    memory = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "n/a (not on a GPU)"
    split = r["time_seconds"]
    return [
        f"- throughput: {r['tokens_per_s']:,.0f} tokens/s ({how}); MFU {mfu}; peak GPU memory {memory}",
        f"- wall time {r['wall_seconds']:.0f} s: compile + warm-up {split['compile_warmup']:.1f} s, training "
        f"{split['training']:.1f} s, validation {split['validation']:.1f} s, checkpointing "
        f"{split['checkpointing']:.1f} s, other (set-up, data, logging) {split['other']:.1f} s",
    ]


def write_report(report: dict[str, Any], run_dir: Path) -> str:
    """Write ``report.json`` and ``report.md``; return the markdown."""
    r = report
    lines = [
        f"# Run report: {r['name']} (experiment {r['experiment']})",
        "",
        f"- routers: {', '.join(r['routers'])}; tags: {', '.join(r['tags'])}; causal: {r['causal']}",
        f"- parameters: {r['params']['total'] / 1e6:.2f}M total, {r['params']['active'] / 1e6:.2f}M active",
        f"- steps: {r['steps']}; training tokens: {r['train_tokens']}",
        *throughput_lines(r),
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
