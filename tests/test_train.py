"""Training end to end on the tiny model with test data: W&B offline, multirun groups, NaN guard, atomic
checkpoints, exact resume, load_model and its errors."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, TEST_CONF_DIR
from google.protobuf.message import DecodeError
from hydra import compose, initialize_config_dir

from moe_variants.routers.topk import TopKRouter
from moe_variants.training.build import load_model
from moe_variants.training.checkpoint import AtomicCheckpointIO, checkpoint_nonfinite, save_atomic
from moe_variants.training.run import run
from moe_variants.training.wandb_offline import read_run

FAST = ["model=tiny", "data=standin", "data.seq_len=32", "data.batch_size=4", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=100", "scheduler.warmup_steps=2", "callbacks.checkpoint.every_n_train_steps=100"]


SMALL = ["data.vocab_size=512", "model.vocab_size=512"]  # small checkpoints, for tests that write many


def compose_run(tmp: Path, *overrides: str, name: str = "test"):
    base = [f"hydra.searchpath=[file://{TEST_CONF_DIR}]", f"run_dir={tmp}", f"name={name}", "logger=csv", *FAST]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*base, *overrides])


# -- reading W&B offline runs back (a .wandb file: LevelDB-log framing of protobuf Records) -----------------
def wandb_records(path: Path, block: int = 32768):
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""  # 7-byte file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # full record / last fragment
            rec = pb.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            buf = b""
            yield rec
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk


def read_wandb_run(run_dir: Path, timeout_s: float = 20.0) -> dict:
    """Name, project, group, tags, config, history, metric definitions and summary of the (last) offline W&B run
    under ``run_dir``. wandb-core may still be flushing right after ``finish()``, so wait for the run's exit
    record."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        assert files, f"no offline W&B run under {run_dir}"
        out = {"config": {}, "history": [], "group": None, "tags": [], "exited": False, "metrics": {}, "summary": {}}
        try:
            recs = list(wandb_records(files[-1]))
        except DecodeError:  # a record wandb-core has not finished writing: read again
            time.sleep(0.2)
            continue
        for rec in recs:
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["group"], out["tags"] = rec.run.run_group, list(rec.run.tags)
                out.update(name=rec.run.display_name, project=rec.run.project, job_type=rec.run.job_type)
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "metric":  # define_metric
                out["metrics"][rec.metric.name or rec.metric.glob_name] = rec.metric
            elif kind == "summary":
                out["summary"].update(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
            elif kind == "config":
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                out["history"].append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif kind == "exit":
                out["exited"] = True
        if out["exited"] or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def csv_losses(run_dir: Path, key: str = "train/lm_loss") -> dict[int, float]:
    losses = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    losses[int(row["step"])] = float(row[key])
    return losses


# -- tests ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 6-step tiny run (CSV logger), shared by the resume and checkpoint tests."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    report = run(compose_run(tmp, "trainer.max_steps=6", "scheduler.total_steps=6"))
    return tmp, report


def test_tiny_run_end_to_end_with_wandb_offline(tmp_path):
    report = run(compose_run(tmp_path, "logger=wandb", "trainer.max_steps=4", "experiment=e2e", name="topk-s0"))
    assert report["steps"] == 4 and set(report["val_loss_per_domain"]) == {"alpha", "beta"}
    assert (tmp_path / "report.md").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["unigram_entropy"] > 0
    assert report["checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")
    wb = read_run(tmp_path, wait_s=60)  # wandb-core may still be flushing right after finish()
    assert wb["exit_code"] == 0, "the W&B run was not closed as finished"
    assert Path(report["wandb_run_dir"]).is_dir()
    assert wb["group"] == "e2e" and {"topk", "seed-0"} <= set(wb["tags"])
    cfg = wb["config"]
    assert cfg["model"]["dim"] == 64 and cfg["router"]["_target_"].endswith("TopKRouter")
    assert cfg["loss"] == {"load_balance": 0.01, "z_loss": 0.001} and cfg["name"] == "topk-s0"
    logged = {k for row in wb["history"] for k in row}
    assert {"train/loss", "train/lm_loss", "train/load_balance", "train/z_loss", "train/lr", "val/loss",
            "val/alpha/loss", "routing/layer0/entropy", "routing/layer1/repeat_first", "routing/layer1/repeat_any",
            "routing/repeat_any", "routing/layer0/load/e7", "train/tokens_per_s"} <= logged


def test_multirun_over_any_key_gets_a_folder_per_job(tmp_path):
    """``-m router=hash router.table=random,balanced``: each job gets its own folder and W&B run named
    ``hash-s0,<its overrides>``, tags with the swept value, one W&B group; one line per Lightning log event, also
    in the job's log file; a progress bar over the steps."""
    fast = [o for o in FAST if "progress_bar" not in o]
    cmd = [sys.executable, "-m", "moe_variants.training.run", "-m", "router=hash", "router.table=random,balanced",
           "seed=0", "experiment=sweep1", f"hydra.searchpath=[file://{TEST_CONF_DIR}]", "logger=wandb",
           "trainer.max_steps=2", "report=false", *fast]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    common = "data.batch_size=4,data.seq_len=32,data=standin,model=tiny"  # sorted; FAST's run-mechanics left out
    for table in ("random", "balanced"):
        name = f"hash-s0,{common},router.table={table},scheduler.warmup_steps=2,trainer.accelerator=cpu"
        run_dir = tmp_path / "runs" / "sweep1" / name
        assert (run_dir / "checkpoints" / "last.ckpt").is_file(), sorted(p.name for p in run_dir.parent.iterdir())
        wb = read_wandb_run(run_dir)
        assert wb["group"] == "sweep1" and wb["name"] == name
        assert {"hash", "seed-0", f"router.table={table}"} <= set(wb["tags"])
        assert wb["config"]["router"]["table"] == table and wb["config"]["choices"]["router"] == "hash"
        assert (run_dir / "run.log").read_text().count("GPU available:") == 1  # Lightning's lines in the job log
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert "router=hash" in overrides  # Hydra's record, written once the run dir was claimed
    output = proc.stdout + proc.stderr
    assert output.count("GPU available:") == 2, output[-3000:]  # once per job
    assert "train: 100%" in output and "2/2" in output and "Epoch 0/-2" not in output


def test_resume_reproduces_uninterrupted_losses(trained, tmp_path):
    ref_dir, _ = trained
    first = run(compose_run(tmp_path, "trainer.max_steps=3", "scheduler.total_steps=6"))
    assert first["steps"] == 3
    second = run(compose_run(tmp_path, "trainer.max_steps=6", "scheduler.total_steps=6", "ckpt_path=last"))
    assert second["steps"] == 6
    ref, resumed = csv_losses(ref_dir), csv_losses(tmp_path)
    assert len(ref) == 6 and sorted(resumed) == sorted(ref)
    torch.testing.assert_close(torch.tensor([resumed[s] for s in sorted(ref)], dtype=torch.float64),
                               torch.tensor([ref[s] for s in sorted(ref)], dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_load_model_rebuilds_trained_model(trained):
    run_dir, _ = trained
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    model, cfg = load_model(ckpt_path)
    assert cfg.model.dim == 64 and not model.training
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    torch.testing.assert_close(model.output.weight, state["model.output.weight"], rtol=0, atol=0)
    ids = torch.randint(3, 300, (1, 16))
    assert model(ids).logits.shape == (1, 16, 32000)
    assert load_model(run_dir)[1].model.dim == 64  # a run dir works too


def test_resume_with_different_model_config_lists_differing_keys(trained, tmp_path):
    run_dir, _ = trained
    cfg = compose_run(tmp_path, "trainer.max_steps=8", f"ckpt_path={run_dir}/checkpoints/last.ckpt",
                      "model.hidden_dim=96", "router.jitter_eps=0.1")
    with pytest.raises(ValueError, match=r"differing keys") as err:
        run(cfg)
    assert "model.hidden_dim: checkpoint 128, config 96" in str(err.value)
    assert "router.jitter_eps" in str(err.value) and "model.dim" not in str(err.value)


def test_fresh_start_into_an_existing_run_is_refused(trained):
    run_dir, _ = trained
    with pytest.raises(ValueError, match="resume it with ckpt_path=last"):
        run(compose_run(run_dir, "trainer.max_steps=6"))


def test_run_dir_in_use_is_refused(tmp_path):
    (tmp_path / ".running").write_text(f"{__import__('socket').gethostname()} {os.getpid()}")  # a live owner
    with pytest.raises(ValueError, match="another moe-train .* is running"):
        run(compose_run(tmp_path, "trainer.max_steps=2"))
    (tmp_path / ".running").write_text(f"{__import__('socket').gethostname()} 999999999")  # stale: taken over
    run(compose_run(tmp_path, "trainer.max_steps=1", "report=false"))
    assert not (tmp_path / ".running").exists()


def test_vocabulary_router_run_reports_its_routing_and_reloads_without_the_corpus(tmp_path):
    """A routing-vocabulary run: the report says what routed the tokens; load_model rebuilds the router from the
    checkpoint alone (vocabulary, piece kinds and tables are buffers) and routes as the trained model."""
    cfg = compose_run(tmp_path, "router=span_prefix", "router.vocab_size=256", "router.learned_top=4",
                      "trainer.max_steps=2")
    report = run(cfg)
    shares = report["routing_shares"]
    assert set(shares) == {"vocab", "bucket", "learned"} and min(shares.values()) > 0
    assert abs(sum(shares.values()) - 1) < 1e-9 and "the learned gate" in (tmp_path / "report.md").read_text()
    model, _ = load_model(tmp_path)
    ids = torch.randint(3, 300, (2, 32))
    from standin_data import StandinDataModule

    from moe_variants.training.build import build_model, make_resources

    dm = StandinDataModule(seq_len=32, batch_size=4)
    dm.setup("fit")
    fresh = build_model(cfg, resources=make_resources(dm))  # the vocabulary of the same (stand-in) corpus
    for a, b in zip(model(ids).routing, fresh.eval()(ids).routing):
        assert torch.equal(a.expert_ids, b.expert_ids)


def test_load_model_rejects_non_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        load_model(text)
    tensors = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, tensors)
    with pytest.raises(ValueError, match="not a Lightning training checkpoint"):
        load_model(tensors)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "epoch": 0}, foreign)
    with pytest.raises(ValueError, match="without a saved moe-variants config"):
        load_model(foreign)
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing.ckpt")


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpts" / "last.ckpt"
    save_atomic({"step": 1}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"step": 2}, path)
    with pytest.raises(OSError):
        save_atomic({"step": 2}, tmp_path / "ckpts" / "new.ckpt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp files, no new.ckpt
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}  # the old checkpoint is intact


def test_nan_loss_raises_before_the_optimizer_step(tmp_path):
    from moe_variants.training.build import build

    r = build(compose_run(tmp_path, "trainer.max_steps=2"))
    with torch.no_grad():
        r.model.norm.weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in r.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"NaN/inf loss at step 0 .*lower the LR"):
        r.trainer.fit(r.lit, datamodule=r.datamodule)
    after = r.model.state_dict()
    assert all(torch.equal(before[k], after[k]) or k == "norm.weight" for k in before)


def test_nan_gradient_keeps_the_last_good_checkpoint_and_resume_is_exact(trained, tmp_path):
    """A NaN gradient at step 3 (injected after backward) stops the run before the optimizer step: no checkpoint of
    that step or later, last.ckpt is the finite step-2 state, and resuming from it ends where the uninterrupted run
    ends, bit for bit."""
    steps = ["trainer.max_steps=6", "scheduler.total_steps=6", "callbacks.checkpoint.every_n_train_steps=2"]
    with pytest.raises(FloatingPointError, match=r"NaN/inf gradient at step 3 \(1 parameters.*lower the LR"):
        run(compose_run(tmp_path, *steps, "+callbacks.nan._target_=fault_injection.NanGradAt", "+callbacks.nan.step=3"))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step000002.ckpt"]
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2 and not checkpoint_nonfinite(last)
    assert not (tmp_path / ".running").exists()
    run(compose_run(tmp_path, *steps, "ckpt_path=last"))
    ref_dir, _ = trained
    want = torch.load(ref_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    got = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert csv_losses(tmp_path) == csv_losses(ref_dir)


def test_huge_learning_rate_never_writes_a_nonfinite_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"optimizer.lr=1000000.0 with optimizer.weight_decay=0.1: AdamW multiplies"):
        run(compose_run(tmp_path, "optimizer.lr=1e6"))
    assert not any(tmp_path.iterdir())  # refused before anything was written
    # without weight decay the weights reach ~1e5 within 3 steps, then the gradients overflow
    with pytest.raises(FloatingPointError, match=r"NaN/inf (gradient|loss) at step (\d+) .*largest \|weight\| now"):
        run(compose_run(tmp_path, "optimizer.lr=1e6", "optimizer.weight_decay=0", "trainer.max_steps=8",
                        "scheduler.warmup_steps=30", "callbacks.checkpoint.every_n_train_steps=1", *SMALL))
    ckpts = {p.name: torch.load(p, map_location="cpu", weights_only=False) for p in tmp_path.glob("checkpoints/*")}
    assert "last.ckpt" in ckpts and len(ckpts) >= 2
    assert all(not checkpoint_nonfinite(c) for c in ckpts.values())
    assert ckpts["last.ckpt"]["global_step"] == max(c["global_step"] for c in ckpts.values()) < 8


def test_checkpoint_io_refuses_nonfinite_values(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    bad = {"state_dict": {"w": torch.ones(3)}, "global_step": 2,
           "optimizer_states": [{"state": {0: {"exp_avg_sq": torch.tensor([1.0, float("inf")])}}}]}
    with pytest.raises(FloatingPointError, match=r"refusing to write checkpoint .* at step 2: non-finite values in "
                                                 r"optimizer_states.0.state.0.exp_avg_sq"):
        AtomicCheckpointIO().save_checkpoint(bad, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1 and sorted(tmp_path.iterdir()) == [path]


def test_load_model_refuses_nonfinite_weights(trained, tmp_path):
    run_dir, _ = trained
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ckpt["state_dict"]["model.output.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match=r"holds NaN/inf weights \(output.weight\).*use an earlier checkpoint"):
        load_model(tmp_path / "nan.ckpt")


def test_resume_refuses_a_silent_change_of_what_is_trained(trained, tmp_path):
    run_dir, _ = trained
    ckpt = f"ckpt_path={run_dir}/checkpoints/last.ckpt"
    with pytest.raises(ValueError, match=r"differing keys:\n  scheduler.total_steps: checkpoint 6, config 8\n"
                                         r"scheduler.total_steps is the LR schedule's horizon") as err:
        run(compose_run(tmp_path, ckpt, "trainer.max_steps=8"))  # the horizon would follow the stop step
    assert "resume_allow_changes=[scheduler.total_steps]" in str(err.value)
    with pytest.raises(ValueError, match=r"optimizer.lr: checkpoint 0.003, config 0.001\n  data.seq_len: checkpoint "
                                         r"32, config 16\n(.|\n)*resume_allow_changes=\[optimizer.lr,data.seq_len\]"):
        run(compose_run(tmp_path, ckpt, "trainer.max_steps=6", "scheduler.total_steps=6", "optimizer.lr=1e-3",
                        "data.seq_len=16"))
    assert not any(tmp_path.iterdir())  # refused runs write nothing
    # explicit: the new LR is taken, the run resumes (here: already at its last step, so it only validates)
    report = run(compose_run(tmp_path, ckpt, "trainer.max_steps=6", "scheduler.total_steps=6", "optimizer.lr=1e-3",
                             "resume_allow_changes=[optimizer.lr]", "report=false"))
    assert report["val_loss"] == trained[1]["val_loss"]


def test_weight_decay_skips_only_norm_gains(tiny_args):
    from moe_variants import Transformer
    from moe_variants.training.lit import LitMoE

    model = Transformer(tiny_args, router=TopKRouter)
    lit = LitMoE(model, optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1),
                 scheduler=None, loss_coefficients={})
    decay, no_decay = lit.configure_optimizers().param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 2 * tiny_args.n_layers + 1  # attention_norm, ffn_norm per layer; final norm
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()["total"]


def test_resumed_sitting_logs_into_the_same_wandb_run(tmp_path):
    run(compose_run(tmp_path, "logger=wandb", "trainer.max_steps=2", "scheduler.total_steps=4"))
    run(compose_run(tmp_path, "logger=wandb", "trainer.max_steps=4", "scheduler.total_steps=4", "ckpt_path=last"))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    sittings = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(sittings) == 2 and all(f"-{run_id}" in name for name in sittings), sittings
