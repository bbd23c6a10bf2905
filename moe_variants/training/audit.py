"""``moe-audit``: the look-ahead audit (:mod:`moe_variants.routers.audit`) of any router config, on real text.

    moe-audit router=span_prefix
    moe-audit router=span_whole_word router.allow_lookahead=true   # FAIL: it looks ahead
    moe-audit router=hash router.table=bigram seeds=4

The router config is composed by Hydra (``conf/audit.yaml``: the ``router`` group plus the audit's settings) and
audited in ``routers.audit.AUDIT_MODEL`` with ``max_seq_len = seq_len``. The inputs are those of a run: the
tokenizer's ids and word-start table, the first validation windows of every domain of the embedded corpus and the
corpus frequency of every id (when the corpus is absent under ``corpus_dir``, that part is skipped and the output
says so), and the data side's span starts (``data.datamodule.Collate``). It lives in ``training`` because, like a
run, it joins a router config with the data side.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from moe_variants.data.tokenizer import (
    bos_id,
    load_tokenizer,
    special_token_ids,
    tokenizer_fingerprint,
    vocab_pieces,
)
from moe_variants.model.args import ModelArgs
from moe_variants.paths import CONF_DIR, REPO_ROOT
from moe_variants.routers import spans
from moe_variants.routers.audit import AUDIT_MODEL, AuditInputs, audit, zipf_counts
from moe_variants.routers.resources import RoutingResources, count_tokens


def validation_windows(corpus_dir: Path, tokenizer, seq_len: int, per_domain: int  # noqa: ANN001
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_domain`` windows of ``seq_len`` tokens of every domain's validation split, packed as the
    data module packs them (a BOS before every document, documents in corpus order), and the (V,) counts of every
    id over the whole split. Raises FileNotFoundError when there is no corpus."""
    import datasets  # heavy, and only needed when a corpus is there

    if not corpus_dir.is_absolute() and not corpus_dir.exists():  # a relative path: also from the repo root
        corpus_dir = REPO_ROOT / corpus_dir
    if not (corpus_dir / "dataset_dict.json").is_file():
        raise FileNotFoundError(corpus_dir)
    val = datasets.load_from_disk(str(corpus_dir))["validation"]
    bos = bos_id(tokenizer)
    encoded = tokenizer.encode_batch([t or "" for t in val["text"]], add_special_tokens=False)
    streams: dict[str, list[int]] = {}
    for enc, domain in zip(encoded, val["domain"]):
        streams.setdefault(domain, []).extend([bos, *enc.ids])
    windows = []
    for domain in sorted(streams):
        ids = torch.tensor(streams[domain], dtype=torch.int64)
        n = min(per_domain, len(ids) // seq_len)
        windows.append(ids[: n * seq_len].view(n, seq_len))
    V = tokenizer.get_vocab_size(with_added_tokens=True)
    counts = count_tokens((torch.tensor(s) for s in streams.values()), V)
    return torch.cat(windows), counts


@functools.lru_cache(maxsize=4)
def corpus_inputs(tokenizer_name: str, corpus_dir: str, seq_len: int, per_domain: int = 4) -> AuditInputs:
    """Audit inputs from the real tokenizer and, when it is built, the corpus's validation split (cached per
    process: the router tests audit many configs with the same inputs)."""
    tok = load_tokenizer(tokenizer_name, corpus_dir=corpus_dir if tokenizer_name.startswith("bpe:") else None)
    kinds = spans.piece_kinds(vocab_pieces(tok), special_token_ids(tok))
    V = kinds.numel()
    notes: list[str] = []  # span routers compute their spans from the ids: the data side provides no span starts
    try:
        windows, counts = validation_windows(Path(corpus_dir), tok, seq_len, per_domain)
        source = f"{tokenizer_name} tokenizer, {len(windows)} validation windows of {corpus_dir}"
    except FileNotFoundError:
        windows, counts = None, zipf_counts(V)
        source = f"{tokenizer_name} tokenizer, no corpus"
        notes.append(f"no corpus at {corpus_dir} (build it with `moe-data`): the real-text part is skipped; base "
                     "sequences are uniform ids over the vocabulary and draws from Zipf counts")
    corpus = windows if windows is not None else torch.multinomial(counts, 64 * seq_len, replacement=True).view(64, -1)
    resources = RoutingResources(lambda: [corpus], kinds, tokenizer_fingerprint(tok))
    return AuditInputs(kinds == spans.WORD, counts, windows, None, resources, source, notes)


def main(argv: list[str] | None = None) -> int:
    """``moe-audit [hydra overrides]``: audit the router config selected by the overrides; 0 = PASS, 1 = FAIL."""
    overrides = sys.argv[1:] if argv is None else argv
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="audit", overrides=overrides)
    label = " ".join(o for o in overrides if o.startswith("router")) or "router=<default>"
    inputs = corpus_inputs(str(cfg.tokenizer), str(cfg.corpus_dir), int(cfg.seq_len), int(cfg.windows_per_domain))
    args = ModelArgs(**{**AUDIT_MODEL, "vocab_size": inputs.vocab_size, "max_seq_len": int(cfg.seq_len)})
    try:
        result = audit(instantiate(cfg.router), args, inputs, seeds=int(cfg.seeds), fail_fast=bool(cfg.fail_fast))
    except (InstantiationException, ValueError) as e:  # e.g. look-ahead without router.allow_lookahead=true
        print(f"cannot build {label}: {e.__cause__ or e}")
        return 2
    where = f"{cfg.seeds} seed(s), training and evaluation mode, {cfg.seq_len} positions; {inputs.source}"
    if result.passed:
        print(f"PASS {label}: no look-ahead in routing or outputs ({where})")
    else:
        print(f"FAIL {label}: look-ahead, {len(result.violations)} violation(s) ({where}), e.g.")
        for v in result.violations[:6]:
            print("  ", v)
    print(result.summary())
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
