"""HF interop: logit parity with transformers.MixtralForCausalLM (fp32, CPU) in both directions,
both on-disk expert layouts, and clear refusals."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_variants import ModelArgs, Transformer
from moe_variants.model.hf import load_hf, save_hf
from moe_variants.routers.hash import HashRouter
from moe_variants.routers.topk import TopKRouter

transformers = pytest.importorskip("transformers")

CONFIGS = [
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=1,
         num_local_experts=8, num_experts_per_tok=2, sliding_window=7, rope_theta=10000.0),
    dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
         num_local_experts=3, num_experts_per_tok=1, sliding_window=None),
]


def hf_model(i: int):
    torch.manual_seed(i)
    cfg = transformers.MixtralConfig(vocab_size=300, max_position_embeddings=128, tie_word_embeddings=False,
                                     **CONFIGS[i])
    return transformers.MixtralForCausalLM(cfg).eval()


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_load_hf_matches_transformers_logits(i, tmp_path):
    ref = hf_model(i)
    ref.save_pretrained(tmp_path)
    ids = torch.randint(0, 300, (2, 20))
    for experts in ("loop", "grouped"):
        ours = load_hf(tmp_path, router=TopKRouter, experts=experts).eval()
        with torch.no_grad():
            diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
        assert diff <= 1e-4, (experts, diff)


def test_load_hf_fused_expert_layout(tmp_path):
    ref = hf_model(0)
    ref.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    E = CONFIGS[0]["num_local_experts"]
    fused = {}
    for name, t in tensors.items():
        if ".experts." not in name:
            fused[name.replace("block_sparse_moe", "mlp")] = t
    for layer in range(CONFIGS[0]["num_hidden_layers"]):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        w1 = torch.stack([tensors[f"{p}.{e}.w1.weight"] for e in range(E)])
        w3 = torch.stack([tensors[f"{p}.{e}.w3.weight"] for e in range(E)])
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], 1)
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [tensors[f"{p}.{e}.w2.weight"] for e in range(E)])
    (tmp_path / "model.safetensors").unlink()
    save_file(fused, str(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (load_hf(tmp_path, router=TopKRouter)(ids).logits - ref(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("window", [None, 5])
def test_save_hf_loads_in_transformers_with_same_logits(window, tmp_path):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=80, vocab_size=300, num_experts=4,
                     num_experts_per_tok=2, max_seq_len=128, sliding_window=window, rope_theta=1e4)
    ours = Transformer(args, router=TopKRouter).eval()
    save_hf(ours, tmp_path)
    ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() <= 1e-4


def test_save_hf_refuses_routers_hf_cannot_express(tmp_path):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=40, vocab_size=100, num_experts=4,
                     num_experts_per_tok=2, max_seq_len=64)
    with pytest.raises(ValueError, match="HashRouter"):
        save_hf(Transformer(args, router=partial(HashRouter)), tmp_path)


def test_mismatched_checkpoint_fails_with_message(tmp_path):
    ref = hf_model(0)
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_local_experts"] = 8  # the weights hold 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks expert weight"):
        load_hf(tmp_path, router=TopKRouter)
    cfg["num_local_experts"] = 4
    cfg["intermediate_size"] = 128  # the weights hold 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_hf(tmp_path, router=TopKRouter)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(tmp_path / "nowhere", router=TopKRouter)
