"""Data side: the embedded multi-domain corpus (``moe-data``), the large shard corpus (``moe-data large``),
tokenizers and Lightning data modules.

Attributes are imported lazily so that ``import moe_variants.data`` stays cheap (no Lightning, no datasets).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CorpusDataModule": "moe_variants.data.datamodule",
    "TextFilesDataModule": "moe_variants.data.datamodule",
    "ShardDataModule": "moe_variants.data.shard_datamodule",
    "DatasetsDataModule": "moe_variants.data.shard_datamodule",
    "build_large": "moe_variants.data.large",
    "DOMAINS": "moe_variants.data.build",
    "build_corpus": "moe_variants.data.build",
    "load_tokenizer": "moe_variants.data.tokenizer",
    "tokenizer_fingerprint": "moe_variants.data.tokenizer",
    "vocab_pieces": "moe_variants.data.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
