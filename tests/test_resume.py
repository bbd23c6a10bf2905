"""Fault injection: one run stopped three times in three ways, each time resumed with ``ckpt_path=last``, ends bit for
bit where the uninterrupted run ends (per-step losses, validation losses, final weights and optimizer state).

Sittings of a 12-step run (checkpoints every 2 steps, validation every 5), each a real process for the stops:
  1. SIGKILL after step 3 (early)                             -> last.ckpt holds step 2
  2. SIGKILL in the middle of writing step 6's checkpoint     -> step 4 kept, a temp file left
  3. Ctrl-C (SIGINT) after step 11                          -> step 11 finished and saved, exit code 130
  4. runs to the end.
Sitting 3 resumes before the halfway point and runs past it (where a data loader whose length Lightning's restored
batch counter cuts short used to replay earlier batches), sitting 4 resumes after it, at a step that is no
checkpoint step.
Real corpus data module (tiny corpus, a small BPE vocabulary so that checkpoints are small), tiny model, CPU.

The shard data module (``data=large``, ``data=datasets``: memory-mapped token shards) reads the same checkpointed
endless stream: a run of it stopped by SIGTERM (what a cluster scheduler sends on preemption) at step 3 of 12 is
saved at that step, exits with 143 and, resumed, ends bit for bit where its uninterrupted run ends.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from tiny_corpus import write_tiny_corpus

from moe_variants.data.tokenizer import load_tokenizer
from moe_variants.training.run import run

STEPS, VOCAB = 12, 300
TEXTS = {"prose": "It was a fine morning, and Emma walked {i} miles to Highbury with Mr. Knightley. ",
         "code": "    def f{i}(x, y):\n        return x * {i} + y  # the {i}th helper\n"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny corpus and its BPE tokenizer under a private data root (the tokenizer is cached there)."""
    root = tmp_path_factory.mktemp("resume_data")
    texts = TEXTS
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf_cache"))
        mp.setenv("MOE_DATA_ROOT", str(root))
        corpus = write_tiny_corpus(root, texts, docs_per_domain=12, val_every=4, tag="resume-tiny")
        assert load_tokenizer(f"bpe:{VOCAB}", corpus).get_vocab_size(with_added_tokens=True) == VOCAB
        yield corpus


def overrides(corpus: Path) -> list[str]:
    return ["model=tiny", f"model.vocab_size={VOCAB}", f"data.corpus_dir={corpus}", f"data.tokenizer=bpe:{VOCAB}",
            "data.seq_len=32", "data.batch_size=4", "data.val_sequences_per_domain=2", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=5", f"trainer.max_steps={STEPS}", "scheduler.warmup_steps=2",
            "callbacks.checkpoint.every_n_train_steps=2", "logger=csv", "+logger.csv.flush_logs_every_n_steps=1",
            "report=false", "name=fi"]


def run_in_process(run_dir: Path, corpus: Path, *extra: str, base: list[str] | None = None) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return run(compose("config", overrides=[*(base or overrides(corpus)), f"run_dir={run_dir}", *extra]))


def run_stopped(run_dir: Path, corpus: Path, step: int, *how: str, base: list[str] | None = None
                ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moe_variants.training.run", *(base or overrides(corpus)), f"hydra.run.dir={run_dir}",
           "ckpt_path=last", "+callbacks.kill._target_=fault_injection.KillAt", f"+callbacks.kill.step={step}", *how]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())


def sittings(run_dir: Path) -> list[dict[str, dict[int, float]]]:
    """Per sitting (CSV logger version, in order): {metric: {step: value}}."""
    out = []
    for version in sorted(run_dir.glob("csv/version_*"), key=lambda p: int(p.name.split("_")[1])):
        metrics: dict[str, dict[int, float]] = {"train/lm_loss": {}, "val/loss": {}}
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                for key, series in metrics.items():
                    if row.get(key):
                        series[int(row["step"])] = float(row[key])
        out.append(metrics)
    return out


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def temp_files(run_dir: Path) -> list[Path]:
    return list((run_dir / "checkpoints").glob(".*.tmp"))


def test_killed_and_interrupted_run_resumes_bit_exact(tmp_path_factory, corpus):
    ref_dir, run_dir = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("stopped")
    ref_report = run_in_process(ref_dir, corpus)
    [ref] = sittings(ref_dir)

    first = run_stopped(run_dir, corpus, 3)
    assert first.returncode == -9 and checkpoint(run_dir)["global_step"] == 2, first.stderr[-3000:]
    second = run_stopped(run_dir, corpus, 6, "+callbacks.kill.during_save=true")
    assert second.returncode == -9 and checkpoint(run_dir)["global_step"] == 4, second.stderr[-3000:]
    assert temp_files(run_dir), "the kill did not land inside a checkpoint write"
    third = run_stopped(run_dir, corpus, 11, "+callbacks.kill.signal=SIGINT")
    after_ctrl_c = checkpoint(run_dir)["global_step"]
    report = run_in_process(run_dir, corpus, "ckpt_path=last")

    parts = sittings(run_dir)
    resumed_at = [0, 2, 4, after_ctrl_c]
    assert len(parts) == 4
    for i, (part, start) in enumerate(zip(parts, resumed_at, strict=True)):
        losses = part["train/lm_loss"]
        assert losses and min(losses) == start, f"sitting {i + 1} did not start at step {start}"
        assert losses == {s: ref["train/lm_loss"][s] for s in losses}, f"sitting {i + 1}: per-step losses differ"
        assert part["val/loss"] == {s: ref["val/loss"][s] for s in part["val/loss"]}, f"sitting {i + 1}: val differs"
    assert {s for part in parts for s in part["val/loss"]} == set(ref["val/loss"])
    assert report["val_loss"] == ref_report["val_loss"]
    final, want = checkpoint(run_dir), checkpoint(ref_dir)
    assert final["global_step"] == want["global_step"] == STEPS
    assert final["state_dict"].keys() == want["state_dict"].keys()
    assert all(torch.equal(final["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"]), "weights"
    for a, b in zip(final["optimizer_states"][0]["state"].values(), want["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b), "optimizer state differs"

    # Ctrl-C: the running step was finished and saved, W&B/exit code say interrupted, the resume command is printed
    assert third.returncode == 130, third.stderr[-3000:]
    assert after_ctrl_c == 11
    assert "resume with:\n  moe-train " in third.stderr and "ckpt_path=last" in third.stderr
    assert not temp_files(run_dir), "the killed write's temp file was not cleared at the next start"

    # going on with another global batch (data.batch_size is per process) must be explicit
    with pytest.raises(ValueError, match=r"trained on 4 windows per optimizer step; this run would read 2 "
                                         r"(.|\n)*resume_allow_changes=\[data.batch_size\]"):
        run_in_process(run_dir, corpus, "ckpt_path=last", "data.batch_size=2", "trainer.max_steps=14",
                       "scheduler.total_steps=12")


def run_ddp(run_dir: Path, corpus: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moe_variants.training.run", *overrides(corpus), f"hydra.run.dir={run_dir}",
           "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "data.batch_size=2", "scheduler.total_steps=12", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=os.environ.copy())


@pytest.mark.slow
def test_ddp_resume_before_the_halfway_point_is_exact(tmp_path_factory, corpus):
    """Two processes (DDP, gloo): a run stopped at step 3 of 12 and resumed ends where the uninterrupted run ends
    (each rank reads its own slice of the stream; the position is the same on every rank)."""
    ref_dir, run_dir = tmp_path_factory.mktemp("ddp_ref"), tmp_path_factory.mktemp("ddp_stopped")
    for proc in (run_ddp(ref_dir, corpus), run_ddp(run_dir, corpus, "trainer.max_steps=3"),
                 run_ddp(run_dir, corpus, "ckpt_path=last")):
        assert proc.returncode == 0, proc.stderr[-3000:]
    [ref] = sittings(ref_dir)
    first, second = sittings(run_dir)
    for part in (first, second):
        assert part["train/lm_loss"] == {s: ref["train/lm_loss"][s] for s in part["train/lm_loss"]}
    assert min(second["train/lm_loss"]) == 3, "the stop step was not saved"
    final, want = checkpoint(run_dir), checkpoint(ref_dir)
    assert final["global_step"] == STEPS
    assert all(torch.equal(final["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("signalled_rank", [0, 1])
def test_ddp_ranks_stop_together_without_a_sync_of_their_own(tmp_path, corpus, signalled_rank):
    """Two processes, SIGTERM to one of them at the end of step 3: both stop after the same step, agreeing through
    the NaN/inf check's one all-reduce per step (SaveOnStop makes none of its own). That all-reduce came before the
    signal, so the agreement, and the stop, come with the next step: 4, saved."""
    proc = run_ddp(tmp_path, corpus, "trainer.max_steps=8",
                   "+callbacks.kill._target_=fault_injection.KillAt", "+callbacks.kill.step=3",
                   "+callbacks.kill.signal=SIGTERM", f"+callbacks.kill.rank={signalled_rank}",
                   "+callbacks.count._target_=fault_injection.CountStopReductions")
    assert proc.returncode in (130, 143), proc.stderr[-3000:]
    assert proc.stderr.count("interrupted (") == 2 and proc.stderr.count("step 4 saved to") == 2, proc.stderr[-3000:]
    assert checkpoint(tmp_path)["global_step"] == 4
    counts = [int((tmp_path / f"stop_reductions-rank{r}.txt").read_text()) for r in (0, 1)]
    assert counts == [0, 0]


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory, corpus):
    """``data=datasets`` overrides: the same texts as JSON Lines, tokenized once into shards (ShardDataModule's
    memory-mapped windows) by the corpus fixture's BPE tokenizer."""
    root = tmp_path_factory.mktemp("shard_data")
    tokenizer = root / "tokenizer.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_DATA_ROOT", str(corpus.parent))
        load_tokenizer(f"bpe:{VOCAB}", corpus).save(str(tokenizer))
    files = {}
    for split, keep in (("train", lambda i: i % 4), ("validation", lambda i: not i % 4)):
        rows = [{"text": t.format(i=i) * 12, "domain": d} for d, t in TEXTS.items() for i in range(12) if keep(i)]
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ["data=datasets", "data.path=json", f"data.data_files={{train:{files['train']},validation:"
            f"{files['validation']}}}", "data.validation_split=validation", f"data.cache_dir={root / 'cache'}",
            f"data.tokenizer={tokenizer}", "data.shard_tokens=2048"]
    return [o for o in overrides(corpus) if not o.startswith(("data.corpus_dir", "data.tokenizer"))] + data


def test_sigterm_on_shard_data_saves_the_step_and_resumes_bit_exact(tmp_path_factory, shard_data):
    ref_dir, run_dir = tmp_path_factory.mktemp("shard_ref"), tmp_path_factory.mktemp("shard_stopped")
    ref_report = run_in_process(ref_dir, None, base=shard_data)
    [ref] = sittings(ref_dir)
    assert sorted(ref["train/lm_loss"]) == list(range(STEPS))

    stopped = run_stopped(run_dir, None, 3, "+callbacks.kill.signal=SIGTERM", base=shard_data)
    assert stopped.returncode == 143, stopped.stderr[-3000:]  # the shell's code for SIGTERM
    assert "SIGTERM: finishing this step and saving it to" in stopped.stderr
    assert "interrupted (SIGTERM): step 3 saved to" in stopped.stderr and "resume with:\n  moe-train " in stopped.stderr
    assert checkpoint(run_dir)["global_step"] == 3  # checkpoints every 2 steps: the SIGTERM step was saved
    assert "DatasetsDataModule" in checkpoint(run_dir)  # the stream position is checkpoint state
    report = run_in_process(run_dir, None, "ckpt_path=last", base=shard_data)

    first, second = sittings(run_dir)
    assert min(first["train/lm_loss"]) == 0 and sorted(second["train/lm_loss"]) == list(range(3, STEPS))
    for part in (first, second):  # bit for bit, also past the halfway point and the data's epoch boundaries
        assert part["train/lm_loss"] == {s: ref["train/lm_loss"][s] for s in part["train/lm_loss"]}
        assert part["val/loss"] == {s: ref["val/loss"][s] for s in part["val/loss"]}
    assert report["val_loss"] == ref_report["val_loss"]
    final, want = checkpoint(run_dir), checkpoint(ref_dir)
    assert final["global_step"] == STEPS
    assert all(torch.equal(final["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"]), "weights"
