"""How the optimizer's update runs (``optimizer_impl`` in ``conf/config.yaml``): torch's fused kernel, its eager
multi-tensor kernels (foreach), or the foreach update compiled by ``torch.compile``.

All three run the optimizer of ``conf/optimizer`` (AdamW) with the same maths and the same state (``exp_avg``,
``exp_avg_sq``, ``step``); they differ in speed and in the last bits of rounding, so a checkpoint written with one
resumes with another. On an H200 the AdamW step over 0.79B bf16 parameters took 4.4 ms fused, 10.7 ms foreach
(torch's CUDA default) and 3.6 ms foreach under ``torch.compile`` with a constant LR
(``experiments/bench/optimizer_step.py``).

The compiled update keeps each group's learning rate as a 0-dim float32 tensor on the parameters' device, with
``capturable=True`` (torch's foreach AdamW takes a tensor lr only then; it also keeps ``step`` on the device): a
Python float is a constant to ``torch.compile``, so an LR schedule that changes it every step would recompile every
step. torch's LR schedulers write a tensor lr in place (``fill_``: ``lr_scheduler._update_param_group_val``), and
:func:`set_lr` does the same for everything else that sets one.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

IMPLEMENTATIONS = ("auto", "fused", "foreach", "compiled")
# the optimizer flags of each implementation (torch.optim.AdamW, Adam, SGD, ... take them)
FLAGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "compiled": {"foreach": True, "capturable": True}}


def check_optimizer_impl(name: Any) -> str:
    """``name`` if it is one of :data:`IMPLEMENTATIONS`, else a ``ValueError`` naming them."""
    if not isinstance(name, str) or name not in IMPLEMENTATIONS:
        raise ValueError(
            f"optimizer_impl={name!r}: set one of {', '.join(IMPLEMENTATIONS)} (auto: compiled when the run compiles "
            f"the model, compile=true, fused otherwise)"
        )
    return name


def resolve_optimizer_impl(name: Any, compiled_model: bool, fp16_clipping: bool = False) -> str:
    """The implementation a run uses: ``auto`` -> ``compiled`` with a compiled model (its compile time is then
    paid anyway), else ``fused``; with fp16 loss scaling and gradient clipping (``fp16_clipping``) -> ``foreach``,
    because the fused kernel unscales the gradients itself and Lightning refuses to clip them then."""
    name = check_optimizer_impl(name)
    if name == "fused" and fp16_clipping:
        raise ValueError(
            "optimizer_impl=fused with fp16 loss scaling (trainer.precision=16-mixed) and gradient clipping: the fused "
            "kernel unscales the gradients itself, so they cannot be clipped before it; set optimizer_impl=foreach or "
            "compiled, or trainer.gradient_clip_val=null"
        )
    if name != "auto":
        return name
    if compiled_model:
        return "compiled"
    return "foreach" if fp16_clipping else "fused"


def build_optimizer(make: Callable[..., Optimizer], groups: list[dict[str, Any]], impl: str | None) -> Optimizer:
    """``make(groups, **flags)`` with the flags of ``impl`` (``fused``, ``foreach`` or ``compiled``; ``None``: ``make``
    as it is). ``compiled``: the lrs become tensors and ``optimizer.step`` runs the update compiled."""
    if impl is None:
        return make(groups)
    if impl not in FLAGS:
        raise ValueError(f"build_optimizer needs fused, foreach or compiled (resolve auto first), got {impl!r}")
    optimizer = make(groups, **FLAGS[impl])
    if impl == "compiled":
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        compile_step(optimizer)
    return optimizer


def compile_step(optimizer: Optimizer) -> None:
    """Replace ``optimizer.step`` by one that runs the closure (Lightning's forward, backward and hooks) eagerly,
    then the optimizer's own step compiled. A bound method, as LR schedulers expect to wrap one."""
    update = torch.compile(type(optimizer).step)

    def step(self: Optimizer, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every optimizer ever stepped in this process holds cache entries on the same code (torch's step): raise
        # the per-code limit (8) to the overall one (256), or the 9th run of a sweep in one process, or a benchmark
        # timing 9 variants, would fall back to the eager update without a word.
        with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.accumulated_recompile_limit):
            update(self)
        return loss

    optimizer.step = types.MethodType(step, optimizer)  # a reference cycle until an LR scheduler wraps it: gc frees it


def set_lr(group: dict[str, Any], value: float | torch.Tensor) -> None:
    """``group["lr"] = value``, in place when the lr is a tensor (the compiled update reads that tensor)."""
    lr = group["lr"]
    if not isinstance(lr, torch.Tensor):
        group["lr"] = float(value)
    elif isinstance(value, torch.Tensor):
        lr.copy_(value)
    else:
        lr.fill_(value)


def lr_copy(lr: float | torch.Tensor) -> float | torch.Tensor:
    """A copy of an lr that shares no memory with it (a scheduler's base lr must not change with the group's)."""
    return lr.detach().clone() if isinstance(lr, torch.Tensor) else lr


def place_step_counters(optimizer: Optimizer) -> None:
    """Move each parameter's ``step`` counter to where its group's implementation keeps it: the parameter's
    device for the fused and the capturable (compiled) update, the CPU for the eager foreach one (torch's own
    placement). ``load_state_dict`` leaves it where the checkpoint's implementation had it."""
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(p.device if on_device else "cpu")
