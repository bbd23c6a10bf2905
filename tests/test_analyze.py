"""moe-analyze end to end on tiny checkpoints (ours with a hash router, and an HF Mixtral directory)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from tiny_corpus import write_tiny_corpus

from moe_variants import ModelArgs, Transformer
from moe_variants.analysis import router_entropy
from moe_variants.analysis.analyze import collect, run
from moe_variants.model.hf import save_hf
from moe_variants.routers.topk import TopKRouter
from moe_variants.training.checkpoint import CONFIG_KEY

ARGS = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=48, vocab_size=32000, num_experts=4,
            num_experts_per_tok=2, max_seq_len=128)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze_data")
    texts = {"prose": "It was a fine morning, and Emma walked {i} miles to Highbury. ",
             "code": "    def f{i}(x):\n        return x * {i}\n"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf_cache"))
        yield write_tiny_corpus(root, texts, docs_per_domain=30, val_every=3, tag="analyze-tiny")


def cfg(ckpt, corpus, out, **kw):
    base = dict(ckpt=str(ckpt), name="t", results_dir=str(out), corpus_dir=str(corpus), domains=None,
                sequences_per_domain=3, seq_len=64, batch_size=2, layers=None, wandb=False)
    return OmegaConf.create({**base, **kw})


def our_checkpoint(path):
    config = {"model": ARGS, "experts": {"impl": "loop"},
              "router": {"_target_": "moe_variants.routers.hash.HashRouter", "_partial_": True, "table": "random",
                         "weights": "uniform", "seed": 0, "num_buckets": 64},
              "data": {"tokenizer": "mixtral", "seq_len": 64}}
    from functools import partial

    from moe_variants.routers.hash import HashRouter

    model = Transformer(ModelArgs(**ARGS), router=partial(HashRouter, num_buckets=64))
    torch.save({CONFIG_KEY: config, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


FILES = ("table5.md", "table5.csv", "predictability.md", "load_per_domain.png", "load_heatmap.png",
         "repeat_rates.png", "tokens.html", "metrics.json")


def test_analyze_our_checkpoint_writes_every_file(corpus, tmp_path):
    ckpt = our_checkpoint(tmp_path / "hash.ckpt")
    metrics = run(cfg(ckpt, corpus, tmp_path / "res"))
    out = tmp_path / "res" / "t"
    for f in FILES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert metrics["domains"] == ["code", "prose"] and len(metrics["layers"]) == 2
    # hash routing is a pure function of the token id
    assert all(layer["token_id_predictability"] == 1.0 for layer in metrics["layers"])
    table = (out / "table5.md").read_text()
    assert "| code |" in table and "random baseline" in table
    for layer in metrics["layers"]:  # every predictability and specialisation number beside its random floor
        for name in ("token_id_predictability", "token_id_predictability_heldout", "vocabulary_specialization",
                     "domain_specialization_max"):
            assert 0 <= layer[f"{name}_random"] < layer[name] or math.isnan(layer[name]), name
    assert "| random |" in (out / "predictability.md").read_text()


def test_offline_entropy_weighs_every_token_alike():
    """Batches of 1 and 3 sequences: the entropy is the mean over all 4 x 16 tokens, not the mean of batch means."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS), router=TopKRouter).eval()
    ids = torch.randint(0, 32000, (4, 16))

    def batch(rows):
        return {"input_ids": ids[rows], "labels": ids[rows], "domain_ids": torch.zeros_like(ids[rows]),
                "span_start": torch.ones_like(ids[rows], dtype=torch.bool),
                "doc_start": torch.zeros_like(ids[rows], dtype=torch.bool)}

    data = collect(model, [[batch(slice(0, 1))], [batch(slice(1, 4))]], None)
    with torch.no_grad():
        logits = model(ids).routing
    for layer, r in enumerate(logits):
        assert data["entropy"][layer] == pytest.approx(router_entropy(r.logits), rel=1e-5)
        per_batch = (router_entropy(r.logits[:1]) + router_entropy(r.logits[1:])) / 2
        assert abs(per_batch - data["entropy"][layer]) > 1e-6  # the two means differ here


def test_analyze_hf_mixtral_directory(corpus, tmp_path):
    torch.manual_seed(0)
    save_hf(Transformer(ModelArgs(**ARGS), router=TopKRouter), tmp_path / "hf")
    metrics = run(cfg(tmp_path / "hf", corpus, tmp_path / "res", layers=[1]))
    assert metrics["routers"] == ["topk(k=2)"]
    assert 0 <= metrics["layers"][0]["repeat_first"] <= 1


def test_analyze_bad_input(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(cfg(tmp_path / "nope.ckpt", corpus, tmp_path))
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(Exception, match="(?i)checkpoint"):
        run(cfg(bogus, corpus, tmp_path))
    ckpt = our_checkpoint(tmp_path / "hash.ckpt")
    with pytest.raises(ValueError, match="out of range"):
        run(cfg(ckpt, corpus, tmp_path, layers=[5]))
    with pytest.raises(ValueError, match="(?i)domain"):
        run(cfg(ckpt, corpus, tmp_path, domains=["pubmed"]))


def test_analyze_refuses_nonfinite_weights(corpus, tmp_path):
    """A checkpoint saved after its run diverged (NaN weights) is refused, not analysed into 100% repeat rates."""
    ckpt = our_checkpoint(tmp_path / "hash.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    saved["state_dict"]["model.layers.1.feed_forward.experts.w2"].view(-1)[0] = float("nan")
    torch.save(saved, ckpt)
    with pytest.raises(ValueError, match=r"holds NaN/inf weights \(layers.1.feed_forward.experts.w2\)"):
        run(cfg(ckpt, corpus, tmp_path / "res"))
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS), router=TopKRouter)
    with torch.no_grad():
        model.output.weight[0, 0] = float("inf")
    save_hf(model, tmp_path / "hf")
    with pytest.raises(ValueError, match=r"holds NaN/inf weights \(output.weight\): it cannot be analysed"):
        run(cfg(tmp_path / "hf", corpus, tmp_path / "res"))
    assert not (tmp_path / "res").exists()
