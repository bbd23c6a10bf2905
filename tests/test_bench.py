"""CPU-sized smoke run of the throughput benchmark (no timing assertions: speed is measured on the GPU)."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "throughput.py"
VARIANTS = ["hf_grouped_mm", "ours_topk", "ours_topk_bf16_mixed", "ours_hash", "ours_span", "ours_topk_forced_balanced",
            "ours_aux_free", "ours_topk_capacity1.0", "ours_fine_grained_shared2", "ours_topk_slice_swiglu",
            "ours_topk_fused_adamw", "ours_topk_bf16_mixed_clip"]


def test_throughput_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    reports = bench.main(["--smoke", "--steps", "1", "--warmup", "0", "--out", str(tmp_path),
                          "--variants", *VARIANTS])
    results = {r["variant"]: r for r in reports[0]["results"]}
    assert set(results) == set(VARIANTS)
    assert all("tokens_per_s" in r and r["tokens_per_s"] > 0 for r in results.values()), results
    assert bench.experts_module.swiglu.__name__ == "swiglu"  # the slice-swiglu variant's patch was undone
    assert (tmp_path / "throughput-smoke.json").is_file() and (tmp_path / "throughput-smoke.md").is_file()
