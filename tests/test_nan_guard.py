"""The NaN/inf guard reads the check of an optimizer step's result one step late (together with the next step's
check: one device sync per step), or at once when a checkpoint is about to be written: a step that ruins the
weights or the optimizer state is never in a checkpoint, whichever path writes it."""

from __future__ import annotations

import signal as signal_module

import pytest
import torch
from test_train import SMALL, compose_run, csv_losses

from moe_variants.training.checkpoint import checkpoint_nonfinite
from moe_variants.training.run import run

# 5 steps, a checkpoint every 2 (step000002, step000004), SaveOnStop writes the last step (5) to last.ckpt
STEPS = ["trainer.max_steps=5", "scheduler.total_steps=5", "callbacks.checkpoint.every_n_train_steps=2",
         "report=false", *SMALL]
BLOW_UP = ["+callbacks.blow._target_=fault_injection.BlowUpAt"]


def saved_steps(tmp_path) -> dict[str, int]:
    """Checkpoint file name -> its global step; every one of them finite."""
    steps = {}
    for path in sorted((tmp_path / "checkpoints").glob("*.ckpt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        assert not checkpoint_nonfinite(ckpt), path
        assert max(float(v.abs().max()) for v in ckpt["state_dict"].values() if v.is_floating_point()) < 10, path
        steps[path.name] = ckpt["global_step"]
    return steps


@pytest.mark.parametrize(("bad", "extra", "kept"), [
    (2, [], {"last.ckpt": 2, "step000002.ckpt": 2}),  # read with step 3's check
    (3, [], {"last.ckpt": 2, "step000002.ckpt": 2}),  # read before the checkpoint of step 4 is built
    (4, [], {"last.ckpt": 4, "step000002.ckpt": 2, "step000004.ckpt": 4}),  # the last step: before SaveOnStop's save
    (2, ["+callbacks.kill._target_=fault_injection.KillAt", "+callbacks.kill.step=3",  # Ctrl-C after it: SaveOnStop
         "+callbacks.kill.signal=SIGINT"], {"last.ckpt": 2, "step000002.ckpt": 2}),  # saves step 3, refused
], ids=["next-step", "checkpoint-step", "last-step", "ctrl-c"])
def test_a_step_that_ruins_the_weights_is_never_saved(tmp_path, bad, extra, kept):
    before = {s: signal_module.getsignal(s) for s in (signal_module.SIGINT, signal_module.SIGTERM)}
    with pytest.raises(FloatingPointError, match=rf"the weights blew up \(the largest \|weight\| went from .* to .*\) "
                                                 rf"after the optimizer step at step {bad}, (.|\n)*lower the LR"):
        run(compose_run(tmp_path, *STEPS, *BLOW_UP, f"+callbacks.blow.step={bad}", *extra))
    assert saved_steps(tmp_path) == kept
    assert not (tmp_path / ".running").exists()
    assert {s: signal_module.getsignal(s) for s in before} == before


def test_an_inf_optimizer_state_is_never_saved(tmp_path):
    """An inf second moment after step 3 leaves the weights finite (the update m / sqrt(inf) is 0); the state check
    before the checkpoint of step 4 refuses it, naming the steps since the state was last seen finite (step 2, the
    last checkpoint)."""
    with pytest.raises(FloatingPointError, match=r"NaN/inf optimizer state \(.*exp_avg_sq.*\) found before writing "
                                                 r"the checkpoint of step 4, with finite weights: an optimizer step "
                                                 r"after step 2 (.|\n)*lower the LR"):
        run(compose_run(tmp_path, *STEPS, "+callbacks.inf._target_=fault_injection.InfStateAt",
                        "+callbacks.inf.step=3"))
    assert saved_steps(tmp_path) == {"last.ckpt": 2, "step000002.ckpt": 2}


def test_a_ruinous_step_is_refused_before_its_validation(tmp_path):
    """Validation right after the bad step (step 2, validation every 3 steps): refused before any validation loss
    of the ruined weights is logged."""
    with pytest.raises(FloatingPointError, match=r"the weights blew up .* after the optimizer step at step 2"):
        run(compose_run(tmp_path, *STEPS, *BLOW_UP, "+callbacks.blow.step=2", "trainer.val_check_interval=3"))
    assert not csv_losses(tmp_path, "val/loss")
    assert saved_steps(tmp_path) == {"last.ckpt": 2, "step000002.ckpt": 2}
