"""Device -> host reads per optimizer step of a ``moe-train`` run: each one stalls a GPU until the host has
caught up (every kernel queued before it must finish, and the GPU idles while the host works its way to the
next launch). On steps where nothing is logged, validated or saved, the NaN/inf guard's one read is all a step
may do. Counted on the CPU, on the tiny model, in a real Lightning run built by ``training.build``."""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from test_train import compose_run, csv_losses
from torch.utils._python_dispatch import TorchDispatchMode

from moe_variants.model.experts import LoopExperts
from moe_variants.model.transformer import Transformer
from moe_variants.training.build import build

# Tensor methods that copy a device tensor to the host. On the CPU they dispatch nothing (the tensor is already
# there), so the counter wraps them; .item(), bool(), float() and int() dispatch aten._local_scalar_dense.
HOST_COPIES = ("tolist", "cpu", "numpy")
# Tensors made from host values on a given device: on a GPU a blocking host -> device copy, which waits for the
# stream like a read does (torch.tensor(0.5, device="cuda") syncs; torch.full((), 0.5, device="cuda") does not).
HOST_VALUES = ("tensor", "as_tensor")
# Reads of the model that GPU runs (experts=grouped compile=true) do not make: the input checks (token ids in
# range) run in eager mode only, torch.compile traces them out; the reference loop over experts (experts=loop, the
# CPU default) reads its group sizes, the grouped experts do not (their backward does not run on the CPU).
NOT_COUNTED = {Transformer._check_input.__code__, LoopExperts.forward.__code__}
SKIPPED_FRAMES = ("torch/utils/_python_dispatch", "torch/_dynamo/", "torch/_compile")


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values per optimizer step (``step``, set by :class:`MarkStep`), with the
    caller's file:line and function for the failure message. Reads of torch.optim's ``step`` counters are not
    counted: torch keeps them on the host unless the optimizer is capturable or fused."""

    def __init__(self, optimizer_steps: Callable[[], set[int]]) -> None:
        super().__init__()
        self.step = -1  # -1: before the first training batch
        self.reads: dict[int, list[str]] = defaultdict(list)
        self.optimizer_steps = optimizer_steps  # data_ptrs of the optimizer's step counters

    def record(self, what: str, tensor: torch.Tensor | None = None) -> None:
        if tensor is not None and tensor.dim() == 0 and tensor.data_ptr() in self.optimizer_steps():
            return
        frame, where = sys._getframe(2), []
        while frame is not None:
            if frame.f_code in NOT_COUNTED:
                return
            if len(where) < 12 and not any(s in frame.f_code.co_filename for s in SKIPPED_FRAMES):
                where.append(f"{frame.f_code.co_filename.rsplit('site-packages/', 1)[-1]}:{frame.f_lineno} "
                             f"{frame.f_code.co_name}")
            frame = frame.f_back
        self.reads[self.step].append(f"{what} at " + " <- ".join(where))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.record("item", args[0])
        return func(*args, **(kwargs or {}))


class MarkStep(L.Callback):
    def __init__(self, reads: HostReads) -> None:
        self.reads = reads

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.reads.step = trainer.global_step


def count_host_reads(monkeypatch: pytest.MonkeyPatch, cfg: Any) -> tuple[dict[int, list[str]], Any]:
    """Train ``cfg`` (``training.build``, then ``fit``) under a :class:`HostReads`; returns the reads per step."""
    r = build(cfg)

    def optimizer_steps() -> set[int]:
        opt = r.lit.trainer.optimizers[0] if r.lit._trainer is not None and r.lit.trainer.optimizers else None
        return {s["step"].data_ptr() for s in opt.state.values() if "step" in s} if opt is not None else set()

    reads = HostReads(optimizer_steps)
    for name in HOST_COPIES:
        method = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            reads.record(_name, self)
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for name in HOST_VALUES:
        make = getattr(torch, name)

        def counted_make(*args: Any, _make: Any = make, _name: str = name, **kwargs: Any) -> Any:
            if kwargs.get("device") is not None:
                reads.record(f"torch.{_name}(..., device=...)")
            return _make(*args, **kwargs)

        monkeypatch.setattr(torch, name, counted_make)
    r.trainer.callbacks.insert(0, MarkStep(reads))
    with reads:
        r.trainer.fit(r.lit, datamodule=r.datamodule)
    monkeypatch.undo()
    return reads.reads, r


@pytest.mark.parametrize("router", ["topk", "aux_free"])
def test_at_most_one_host_read_per_quiet_step(tmp_path, monkeypatch, router):
    """8 steps, logged at steps 3 and 7 (Lightning writes when (step + 1) % log_every_n_steps == 0), the last
    one saved, no validation, the progress bar on: steps 1, 2 and 4-6 read at most once (the NaN/inf guard). Step
    0 is left out: it builds the optimizer state, once (torch.optim makes the step counters from host values)."""
    cfg = compose_run(tmp_path, f"router={router}", "trainer.max_steps=8", "scheduler.total_steps=8",
                      "trainer.log_every_n_steps=4", "trainer.enable_progress_bar=true", "report=false")
    reads, r = count_host_reads(monkeypatch, cfg)
    assert r.trainer.global_step == 8
    for key in ("train/loss", "train/lr", "routing/load_max"):  # logged where Lightning writes, nowhere else
        assert sorted(csv_losses(tmp_path, key)) == [3, 7], key
    quiet = [1, 2, 4, 5, 6]
    too_many = {s: reads[s] for s in quiet if len(reads[s]) > 1}
    assert not too_many, "host reads per step:\n" + "\n".join(
        f"step {s}: {len(v)}\n  " + "\n  ".join(v) for s, v in too_many.items())
