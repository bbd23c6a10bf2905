"""A trained run exported as an HF folder loads with transformers' Auto classes and pipeline, with the run's own
tokenizer, the same logits and the same greedy generation as our model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONF_DIR, TEST_CONF_DIR
from hydra import compose, initialize_config_dir
from tiny_corpus import write_tiny_corpus

from moe_variants.data.tokenizer import load_tokenizer
from moe_variants.training.build import load_model
from moe_variants.training.export import export_hf
from moe_variants.training.run import run

transformers = pytest.importorskip("transformers")

PROMPT = "It was a fine morning, and Emma walked"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-step tiny top-2 run on a tiny real-text corpus (Mixtral tokenizer), exported."""
    root = tmp_path_factory.mktemp("export")
    texts = {"prose": "It was a fine morning, and Emma walked {i} miles to Highbury. ",
             "code": "    def f{i}(x):\n        return x * {i}\n"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf_cache"))
        corpus = write_tiny_corpus(root, texts, docs_per_domain=12, val_every=3, tag="export-tiny")
        overrides = [f"hydra.searchpath=[file://{TEST_CONF_DIR}]", f"run_dir={root / 'run'}", "name=topk-s0",
                     "logger=csv", "model=tiny", "data=corpus", f"data.corpus_dir={corpus}", "data.seq_len=32",
                     "data.batch_size=4", "data.val_sequences_per_domain=2", "trainer.accelerator=cpu",
                     "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                     "trainer.max_steps=2", "report=false"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            run(compose("config", overrides=overrides))
    return root / "run", export_hf(root / "run", root / "hf")


def test_export_is_a_complete_hf_folder(exported):
    _, out = exported
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"}
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_auto_tokenizer_encodes_like_the_runs_tokenizer(exported):
    _, out = exported
    ours, hf = load_tokenizer("mixtral"), transformers.AutoTokenizer.from_pretrained(out)
    for text in (PROMPT, "    def f3(x):\n        return x * 3\n", "Ünïcödé, 漢字 and a literal <s>."):
        ids = hf(text)["input_ids"]
        assert ids == [1, *ours.encode(text).ids]  # BOS, as every training document began
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ours.encode(text).ids)
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")


def test_auto_model_generates_the_tokens_of_our_generate(exported):
    run_dir, out = exported
    ours, _ = load_model(run_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (model(ids).logits - ours(ids).logits).abs().max() <= 1e-4
        expected, _ = ours.generate(ids, max_new_tokens=12)
        got = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert got.tolist() == expected.tolist()
    pipe = transformers.pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    text = pipe(PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0]["generated_text"]
    # the pipeline appends the new tokens decoded on their own (the SentencePiece decoder drops one leading space)
    assert text == PROMPT + tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_export_refuses_a_tokenizer_of_another_vocabulary(exported, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models

    from moe_variants.training import export

    run_dir, _ = exported
    small = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    monkeypatch.setattr(export, "run_tokenizer", lambda config: small)
    with pytest.raises(ValueError, match="not the tokenizer this model was trained with"):
        export_hf(run_dir, tmp_path / "hf")
