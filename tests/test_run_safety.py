"""What a run does when it cannot or must not go on: refused runs leave the run dir as it was, a full disk or a
read-only folder gives one clear line naming the path, Ctrl-C saves the step it finishes and closes the W&B run as
interrupted, a learning rate <= 0 is refused, and numeric names work."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, TEST_CONF_DIR
from hydra import compose, initialize_config_dir
from test_train import FAST, compose_run

from moe_variants.analysis.analyze import result_name
from moe_variants.training import build as build_module
from moe_variants.training.build import claim_run_dir
from moe_variants.training.checkpoint import save_atomic
from moe_variants.training.interrupt import Interrupted
from moe_variants.training.run import run
from moe_variants.training.wandb_offline import read_run


def snapshot(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_refused_runs_leave_the_run_dir_untouched(tmp_path):
    """Through the real CLI (Hydra writes .hydra/ and a log file before the task runs, unless told otherwise): a
    second moe-train into a live run's folder, and a fresh start into a finished run's folder, are both refused
    without writing, overwriting or creating anything there."""
    busy, done = tmp_path / "runs" / "x" / "busy", tmp_path / "runs" / "x" / "done"
    for d in (busy, done):
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text("the running run's config\n")
        (d / "run.log").write_text("its log\n")
    (busy / ".running").write_text(f"{socket.gethostname()} {os.getpid()}")  # this (live) process
    (done / "checkpoints").mkdir()
    (done / "checkpoints" / "last.ckpt").write_bytes(b"a finished run's checkpoint")
    before = {d: snapshot(d) for d in (busy, done)}
    script = (
        "import sys\nfrom moe_variants.training.run import main\nargs = sys.argv[1:]\n"
        "for name in ('busy', 'done'):\n"
        "    sys.argv = ['moe-train', f'name={name}', *args]\n"
        "    try:\n        main()\n    except SystemExit as e:\n        print('exit', e.code, file=sys.stderr)\n"
    )
    argv = ["experiment=x", f"hydra.searchpath=[file://{TEST_CONF_DIR}]", "logger=csv", "trainer.max_steps=1", *FAST]
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    assert proc.stderr.count("exit 1") == 2, proc.stderr[-3000:]
    assert f"another moe-train ({socket.gethostname()} pid {os.getpid()}) is running in {busy}" in proc.stderr
    assert f"{done} already holds a run (checkpoints/last.ckpt): resume it with ckpt_path=last" in proc.stderr
    assert {d: snapshot(d) for d in (busy, done)} == before


def test_full_disk_and_read_only_folder_give_one_clear_line(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    save_atomic({"step": 1}, path)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        with pytest.raises(OSError, match=rf"^\[Errno 28\] no space left to write checkpoint {path} \(No space "
                                          r"left on device\): free space on that disk") as err:
            save_atomic({"step": 2}, path)
    assert err.value.__cause__ is None and "\n" not in str(err.value)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # old checkpoint kept, no temp file
    assert torch.load(path, weights_only=True) == {"step": 1}

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        with pytest.raises(OSError, match=rf"cannot write checkpoint {path} \(Read-only file system\): make "
                                          rf"{path.parent} writable"):
            save_atomic({"step": 2}, path)
    with monkeypatch.context() as m:
        m.setattr(build_module.os, "open", read_only)
        with pytest.raises(OSError, match=rf"cannot write the run dir's lock {tmp_path / '.running'} \(Read-only"):
            claim_run_dir(tmp_path)


def test_ctrl_c_saves_the_step_and_marks_the_wandb_run_interrupted(tmp_path, capsys):
    """SIGINT during training (sent by a test callback after step 2, in this process): step 2 is finished and
    saved, W&B records exit code 130, the resume command is printed. The numeric name=7 is the W&B run's name."""
    cfg = compose_run(tmp_path, "logger=wandb", "trainer.max_steps=6", "+callbacks.kill.step=2",
                      "+callbacks.kill._target_=fault_injection.KillAt", "+callbacks.kill.signal=SIGINT", name="7")
    with pytest.raises(Interrupted, match=r"interrupted \(Ctrl-C\): step 2 saved to .*last.ckpt"):
        run(cfg)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    err = capsys.readouterr().err
    assert "Ctrl-C: finishing this step and saving it to" in err
    assert f"resume with:\n  moe-train hydra.run.dir={tmp_path} ckpt_path=last" in err
    wb = read_run(tmp_path, wait_s=60)
    assert wb["exit_code"] == 130 and wb["config"]["name"] == "7"
    assert not (tmp_path / ".running").exists()


@pytest.mark.parametrize(("lr", "shown"), [("0", "0"), ("-1e-3", "-0.001")])
def test_learning_rate_must_be_positive(tmp_path, lr, shown):
    with pytest.raises(ValueError, match=rf"optimizer.lr={shown} trains nothing .*set a learning rate > 0"):
        run(compose_run(tmp_path, f"optimizer.lr={lr}"))
    assert not any(tmp_path.iterdir())


def test_numeric_names_are_names():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("analyze", overrides=["ckpt=runs/x/last.ckpt", "name=nan"])
    assert result_name(cfg.name, cfg.ckpt) == "nan"
    assert result_name(7, "x") == "7" and result_name(None, "/a/b/run.ckpt") == "run"
