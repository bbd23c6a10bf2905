"""What W&B shows of a run and of its analysis (read back from the offline files), the run report's throughput
and time split, checkpoints' file mode, and where Lightning's log lines go."""

from __future__ import annotations

import logging
import os
import stat

import pytest
from omegaconf import OmegaConf
from test_train import compose_run, read_wandb_run
from tiny_corpus import write_tiny_corpus

from moe_variants.training.checkpoint import save_atomic
from moe_variants.training.console import LIGHTNING_LOGGERS, log_through_root
from moe_variants.training.run import run


@pytest.fixture(scope="module")
def hash_run(tmp_path_factory):
    """A 4-step tiny run with a hash router, seed 1, W&B offline, a heatmap every 3 steps (steps 0 and 3)."""
    tmp = tmp_path_factory.mktemp("hash_run")
    cfg = compose_run(tmp, "logger=wandb", "router=hash", "seed=1", "experiment=dash", "trainer.max_steps=4",
                      "trainer.log_every_n_steps=2", "callbacks.load_heatmap.every_n_steps=3", name="hash-s1")
    return tmp, run(cfg)


def test_training_run_logs_load_heatmaps_repeat_any_and_best_val_loss(hash_run):
    run_dir, report = hash_run
    wb = read_wandb_run(run_dir)
    assert wb["exited"]
    key = "routing/load_heatmap"
    heatmaps = {row["trainer/global_step"]: row for row in wb["history"] if f"{key}/_type" in row}
    assert sorted(heatmaps) == [0, 3]
    assert all(h[f"{key}/_type"] == "images/separated" and h[f"{key}/format"] == "png" for h in heatmaps.values())
    media = sorted((run_dir / "wandb").glob("offline-run-*/files/media/images/routing/load_heatmap_*.png"))
    assert len(media) == 2 and all(p.stat().st_size > 1000 for p in media)
    logged = {k for row in wb["history"] for k in row}
    assert {"routing/repeat_any", "routing/layer0/repeat_any", "routing/layer1/repeat_any"} <= logged
    for name in ("val/loss", "val/alpha/loss", "train/loss"):  # define_metric: min and last, on the step axis
        metric = wb["metrics"][name]
        assert metric.summary.min and metric.summary.last and metric.step_metric == "trainer/global_step"
    assert wb["summary"]["val/loss"]["min"] == pytest.approx(report["val_loss"])
    assert wb["summary"]["report/tokens_per_s"] == pytest.approx(report["tokens_per_s"])


def test_report_gives_steady_state_throughput_and_where_the_time_went(hash_run):
    run_dir, report = hash_run
    t = report["throughput"]
    # log_every_n_steps=2, 4 steps: windows at steps 2 and 4; the steady state is the second alone
    assert len(t["window_tokens_per_s"]) == 2 and t["steady"] and t["steady_windows"] == 1
    assert report["tokens_per_s"] == t["window_tokens_per_s"][1]
    assert t["tokens"] == report["train_tokens"] == 4 * 4 * 32
    assert report["mfu"] is None and report["peak_memory_gib"] is None  # CPU: no peak FLOP/s, no GPU memory
    split = report["time_seconds"]
    assert set(split) == {"compile_warmup", "training", "validation", "checkpointing", "other"}
    assert all(v >= 0 for v in split.values()) and split["validation"] > 0 and split["checkpointing"] > 0
    assert sum(split.values()) == pytest.approx(report["wall_seconds"])
    md = (run_dir / "report.md").read_text()
    assert "median of the 1 logged windows of 2 steps after the first (compile and warm-up excluded)" in md
    assert "compile + warm-up" in md and "checkpointing" in md


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash_data")
    texts = {"prose": "It was a fine morning, and Emma walked {i} miles to Highbury. ",
             "code": "    def f{i}(x):\n        return x * {i}\n"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf_cache"))
        yield write_tiny_corpus(root, texts, docs_per_domain=12, val_every=3, tag="dash-tiny")


def test_analysis_run_groups_with_the_run_it_analyses(hash_run, corpus, tmp_path):
    from moe_variants.analysis.analyze import run as analyze

    run_dir, _ = hash_run
    cfg = OmegaConf.create(dict(ckpt=str(run_dir), name="hash-s1", results_dir=str(tmp_path), corpus_dir=str(corpus),
                                domains=None, sequences_per_domain=2, seq_len=32, batch_size=2, layers=None,
                                wandb=True, wandb_mode="offline"))
    analyze(cfg)
    wb = read_wandb_run(tmp_path / "hash-s1")
    assert wb["exited"] and wb["project"] == "moe-variants" and wb["group"] == "dash"
    assert wb["job_type"] == "analysis" and {"analysis", "hash", "seed-1"} <= set(wb["tags"])
    config = wb["config"]
    assert config["seed"] == 1 and config["experiment"] == "dash" and config["choices"]["router"] == "hash"
    assert config["router"]["_target_"].endswith("HashRouter") and config["analysis"]["checkpoint"] == str(run_dir)
    assert wb["summary"]["analysis/token_id_predictability"] == 1.0  # a hash router is a function of the token id
    assert {"table5", "load_heatmap", "layer/repeat_any"} <= {k.split("/_type")[0] for row in wb["history"]
                                                              for k in row}


def test_checkpoints_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_atomic({"step": 1}, tmp_path / "a.ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode) == 0o640
    save_atomic({"step": 1}, tmp_path / "b.ckpt")
    assert stat.S_IMODE((tmp_path / "b.ckpt").stat().st_mode) == 0o666 & ~old


def test_lightning_log_records_reach_the_root_handlers_once():
    import lightning  # noqa: F401  (its loggers and their own handlers exist from import on)

    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in LIGHTNING_LOGGERS}
    root, records = logging.getLogger(), []
    handler = logging.Handler()
    handler.emit = records.append
    root.addHandler(handler)
    try:
        log_through_root()
        assert all(not logging.getLogger(n).handlers and logging.getLogger(n).propagate for n in LIGHTNING_LOGGERS)
        logging.getLogger("lightning.pytorch.utilities.rank_zero").warning("one line")
        assert [r.getMessage() for r in records] == ["one line"]
    finally:
        root.removeHandler(handler)
        for n, (handlers, propagate) in saved.items():
            logging.getLogger(n).handlers[:] = handlers
            logging.getLogger(n).propagate = propagate
