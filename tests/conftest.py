"""Shared fixtures. Every test runs with W&B offline and with W&B / datasets caches in a temporary folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_variants import ModelArgs

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
CONF_DIR = REPO_ROOT / "conf"
TEST_CONF_DIR = TESTS_DIR / "conf"  # test-only configs (data=standin), added with hydra.searchpath
sys.path.insert(0, str(TESTS_DIR))  # so that Hydra can instantiate standin_data.StandinDataModule

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=32000, num_experts=8,
            num_experts_per_tok=2, max_seq_len=512)


@pytest.fixture
def tiny_args() -> ModelArgs:
    return ModelArgs(**TINY)


@pytest.fixture(autouse=True)
def _offline_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var, sub in (("WANDB_DIR", "wandb"), ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_DATA_DIR", "wandb-data"), ("HF_DATASETS_CACHE", "hf-datasets")):
        monkeypatch.setenv(var, str(cache / sub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))


def spawn_gloo(check, world: int, tmp_path: Path, *args) -> None:
    """Run ``check(rank, *args)`` in ``world`` processes joined in one gloo process group (one CPU thread each,
    rendezvous through a file in ``tmp_path``); a failure in any process fails the caller. ``check`` must be a
    module-level function (the processes are spawned: it is pickled by name)."""
    mp.spawn(_gloo_process, args=(check, world, f"file://{tmp_path / 'rendezvous'}", args), nprocs=world, join=True)


def _gloo_process(rank: int, check, world: int, init_method: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        check(rank, *args)
    finally:
        dist.destroy_process_group()
