"""Export a trained run as a complete HF ``transformers`` folder: weights, config and the run's own tokenizer.

    moe-export runs/default/topk-s0 exports/topk-s0      # or: python -m moe_variants.training.export ...

The folder loads with ``AutoTokenizer.from_pretrained``, ``AutoModelForCausalLM.from_pretrained`` and
``pipeline("text-generation", model=...)`` (``transformers`` itself is not needed to write it). Only runs with
Mixtral's learned top-k router can be exported (``model.hf.save_hf`` says why).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from tokenizers import Tokenizer, processors

from moe_variants.data.tokenizer import bos_id, eos_id
from moe_variants.model.hf import save_hf
from moe_variants.training.build import load_model

# texts the written tokenizer.json must encode exactly as the run's tokenizer does (after its BOS)
PROBE_TEXTS = ("Hello world.", "  two  spaces\nnew line\ttab", "def f(x):\n    return x ** 2", "é ü 漢字 🙂",
               "a literal <s> and </s>")


def hf_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of the run's tokenizer that puts BOS in front of every text, as Mixtral's HF tokenizer does (the
    data module gave every training document that BOS itself; the run's tokenizer adds none)."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    bos = tok.id_to_token(bos_id(tokenizer))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id(tokenizer))])
    return tok


def save_hf_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike[str], model_max_length: int) -> None:
    """Write ``tokenizer.json`` (:func:`hf_tokenizer`) and ``tokenizer_config.json`` into ``path``; check that the
    file read back encodes :data:`PROBE_TEXTS` token for token like ``tokenizer`` (plus the BOS)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_tokenizer(tokenizer).save(str(path / "tokenizer.json"))
    unk = tokenizer.id_to_token(0)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is (no model-specific rebuilding)
        "bos_token": tokenizer.id_to_token(bos_id(tokenizer)),
        "eos_token": tokenizer.id_to_token(eos_id(tokenizer)),
        "unk_token": unk if unk in {t.content for t in tokenizer.get_added_tokens_decoder().values()} else None,
        "model_max_length": model_max_length,
        "split_special_tokens": bool(tokenizer.encode_special_tokens),  # the text "<s>" is not BOS, as in training
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    written = Tokenizer.from_file(str(path / "tokenizer.json"))
    written.encode_special_tokens = tokenizer.encode_special_tokens  # what split_special_tokens sets in HF
    for text in PROBE_TEXTS:
        expected = [bos_id(tokenizer), *tokenizer.encode(text).ids]
        if written.encode(text).ids != expected:
            raise RuntimeError(f"the written tokenizer.json encodes {text!r} differently from the run's tokenizer")


def run_tokenizer(config: Any) -> Tokenizer:
    """The tokenizer the run trained with: its data module, rebuilt from the saved config (not set up)."""
    tokenizer = getattr(instantiate(config.data), "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"the run's data module ({config.data.get('_target_')}) has no tokenizer to export")
    return tokenizer


def export_hf(run: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Export a run dir (its ``checkpoints/last.ckpt``) or a checkpoint file to the HF folder ``out``."""
    model, config = load_model(run)
    tokenizer = run_tokenizer(config)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab != model.args.vocab_size:
        raise ValueError(f"the run's tokenizer has {vocab} tokens but the model {model.args.vocab_size}: not the "
                         f"tokenizer this model was trained with")
    out = Path(out)
    save_hf(model, out, bos_token_id=bos_id(tokenizer), eos_token_id=eos_id(tokenizer))
    save_hf_tokenizer(tokenizer, out, model_max_length=model.args.max_seq_len)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run dir (runs/<experiment>/<name>) or a .ckpt file")
    parser.add_argument("out", help="the HF folder to write")
    args = parser.parse_args(argv)
    print(f"wrote {export_hf(args.run, args.out)}/: config.json model.safetensors tokenizer.json "
          f"tokenizer_config.json")


if __name__ == "__main__":
    main()
