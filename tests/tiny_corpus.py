"""A tiny multi-domain corpus saved the way `moe-data` saves one (for tests that need real text quickly)."""

from __future__ import annotations

import json
from pathlib import Path


def write_tiny_corpus(root: Path, texts: dict[str, str], docs_per_domain: int, val_every: int, tag: str) -> Path:
    """``texts[domain]`` is a template with ``{i}``; every ``val_every``-th doc goes to validation.

    Returns the corpus folder (``root/corpus``) with ``train``/``validation`` splits and a manifest.
    """
    import datasets

    rows = {s: {"text": [], "domain": [], "source": []} for s in ("train", "validation")}
    for domain, template in texts.items():
        for i in range(docs_per_domain):
            split = "validation" if i % val_every == 0 else "train"
            rows[split]["text"].append(template.format(i=i) * 12)
            rows[split]["domain"].append(domain)
            rows[split]["source"].append(domain)
    corpus = root / "corpus"
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in rows.items()}).save_to_disk(str(corpus))
    (corpus / "manifest.json").write_text(json.dumps({"corpus_sha256": tag}))
    return corpus
