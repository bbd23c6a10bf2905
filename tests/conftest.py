"""Shared fixtures. Every test runs with W&B offline and with W&B / datasets caches in a temporary folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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
