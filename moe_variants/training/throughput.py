"""Training throughput, model FLOP utilisation and where a run's time goes, for the live logs and the run report.

The run is timed on a *training clock*: wall time from the start of training, minus validation and minus
checkpoint writing. Every ``trainer.log_every_n_steps`` steps a window closes and ``train/tokens_per_s`` (all
ranks' tokens) and ``train/mfu`` are logged for it. The first window holds ``torch.compile`` and the warm-up, so
the steady-state speed of the report is the median of the windows after the first; the first window's excess
over that speed is reported as compile + warm-up time.

Why not Lightning's ``ThroughputMonitor``: it keeps no record of its windows (the report needs them), counts
checkpoint writing as training time, and takes peak FLOP/s from ``get_available_flops``, which returns None for
a device named "NVIDIA H200" and lists H200's with-sparsity bf16 figure (2.0e15) rather than the dense 989e12
that MFU is quoted against.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
import torch

from moe_variants.model.args import ModelArgs

# dense (no sparsity) tensor-core peak FLOP/s per device for bf16/fp16, by a substring of the device name
DENSE_PEAK_FLOPS = {"h200": 989e12, "h100": 989e12, "a100": 312e12}
HALF_PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true", "bf16", "16")


def model_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x the matmul parameters one token uses (attention
    projections, its top-K experts, the router gate, the LM head; the embedding is a lookup) + causal attention
    (QK^T and AV over on average half the context, or the sliding window)."""
    head_dim = args.head_dim
    attention_proj = args.dim * head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    experts = args.num_experts_per_tok * 3 * args.dim * args.hidden_dim
    per_layer = attention_proj + experts + args.dim * args.num_experts
    matmul_params = args.n_layers * per_layer + args.dim * args.vocab_size
    context = min(seq_len, args.sliding_window or seq_len)
    attention = args.n_layers * 6 * context * args.n_heads * head_dim
    return 6.0 * matmul_params + attention


def dense_peak_flops(device: torch.device, precision: str) -> float | None:
    """Datasheet dense peak FLOP/s of one device for half-precision training; None when not known (CPU, fp32)."""
    if device.type != "cuda" or str(precision) not in HALF_PRECISIONS:
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((flops for chip, flops in DENSE_PEAK_FLOPS.items() if chip in name), None)


class Throughput(L.Callback):
    """Logs ``train/tokens_per_s`` and ``train/mfu`` per window of ``trainer.log_every_n_steps`` steps; keeps
    the windows and the time spent in validation and checkpoint writing for :meth:`summary`.

    Args:
        peak_flops: peak FLOP/s of one device for MFU; None = the dense bf16/fp16 figure of a known GPU.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self.tokens = 0  # all ranks
        self.windows: list[dict[str, float]] = []  # {"steps", "tokens", "seconds", "tokens_per_s", "full"}
        self.validation_seconds = 0.0
        self.train_seconds = 0.0
        self.peak_memory_gib: float | None = None
        self.flops_per_token: float | None = None
        self.world_size = 1
        self._start: float | None = None  # perf_counter at the start of training (None outside fit)
        self._excluded = 0.0  # validation seconds inside the training clock
        self._ckpt_at_start = 0.0
        self._val_start: float | None = None
        self._steps = 0  # optimizer steps of this sitting
        self._window = {"steps": 0, "tokens": 0, "clock": 0.0}  # what the open window started from
        self._device, self._precision = torch.device("cpu"), "32-true"

    # -- the training clock --------------------------------------------------------------------------------
    def _now(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # queued kernels belong to the interval that launched them
        return time.perf_counter()

    @staticmethod
    def checkpoint_seconds(trainer: L.Trainer) -> float:
        """Seconds spent writing checkpoints (``checkpoint.AtomicCheckpointIO.seconds``; 0 for other IO)."""
        return float(getattr(trainer.strategy.checkpoint_io, "seconds", 0.0))

    def _clock(self, trainer: L.Trainer, now: float) -> float:
        assert self._start is not None
        ckpt = self.checkpoint_seconds(trainer) - self._ckpt_at_start
        return now - self._start - self._excluded - ckpt

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device, self._precision = pl_module.device, str(trainer.precision)
        self.world_size = trainer.world_size
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        self._excluded, self._ckpt_at_start = 0.0, self.checkpoint_seconds(trainer)
        self._window = {"steps": 0, "tokens": self.tokens, "clock": 0.0}
        self._steps = 0
        self._start = self._now()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._start is None:
            return
        ids = batch["input_ids"]  # (B, S) on this rank; the data module gives every rank the same shape
        if self.flops_per_token is None:
            self.flops_per_token = model_flops_per_token(pl_module.model.args, int(ids.shape[1]))
        self.tokens += int(ids.numel()) * trainer.world_size
        self._steps += 1
        if trainer.global_step % trainer.log_every_n_steps == 0:  # the steps Lightning logs at
            window = self._close_window(trainer, full=True)
            if window is not None:
                pl_module.log("train/tokens_per_s", window["tokens_per_s"], on_step=True, on_epoch=False)
                mfu = self.mfu(window["tokens_per_s"])
                if mfu is not None:
                    pl_module.log("train/mfu", mfu, on_step=True, on_epoch=False)

    def _close_window(self, trainer: L.Trainer, full: bool) -> dict[str, float] | None:
        clock = self._clock(trainer, self._now())
        steps, tokens = self._steps - self._window["steps"], self.tokens - self._window["tokens"]
        seconds = clock - self._window["clock"]
        self._window = {"steps": self._steps, "tokens": self.tokens, "clock": clock}
        if steps == 0 or seconds <= 0:
            return None
        window = {"steps": steps, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                  "full": full}
        self.windows.append(window)
        return window

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None:
            return
        self._close_window(trainer, full=False)  # the steps after the last logged window, if any
        self.train_seconds += self._window["clock"]
        if self._device.type == "cuda":
            self.peak_memory_gib = torch.cuda.max_memory_allocated(self._device) / 2**30
        self._start = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = self._now()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is None:
            return
        seconds = self._now() - self._val_start
        self.validation_seconds += seconds
        if self._start is not None:  # inside fit: not training time
            self._excluded += seconds
        self._val_start = None

    # -- results -------------------------------------------------------------------------------------------
    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOP utilisation: model FLOPs per second over the peak of all devices of the run."""
        peak = self.peak_flops if self.peak_flops is not None else dense_peak_flops(self._device, self._precision)
        if peak is None or self.flops_per_token is None:
            return None
        return tokens_per_s * self.flops_per_token / (peak * self.world_size)

    def summary(self) -> dict[str, Any]:
        """Steady-state tokens/s and MFU, and the training clock split into compile + warm-up and steady training.

        Steady state = the median of the full windows after the first (``steady_windows`` of them); with fewer
        than two full windows it is the mean over all training (``steady`` False: warm-up included)."""
        full = [w for w in self.windows if w["full"]]
        steady_windows = full[1:]
        if steady_windows:
            tokens_per_s = statistics.median(w["tokens_per_s"] for w in steady_windows)
            first = self.windows[0]
            warmup = max(0.0, first["seconds"] - first["tokens"] / tokens_per_s)
        else:
            tokens_per_s = self.tokens / self.train_seconds if self.train_seconds > 0 else float("nan")
            warmup = 0.0
        return {
            "tokens": self.tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": self.mfu(tokens_per_s),
            "steady": bool(steady_windows),
            "steady_windows": len(steady_windows),
            "window_steps": steady_windows[0]["steps"] if steady_windows else None,
            "window_tokens_per_s": [w["tokens_per_s"] for w in self.windows],
            "flops_per_token": self.flops_per_token,
            "world_size": self.world_size,
            "train_seconds": self.train_seconds,
            "compile_warmup_seconds": warmup,
            "validation_seconds": self.validation_seconds,
            "peak_memory_gib": self.peak_memory_gib,
        }
