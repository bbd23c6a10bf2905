"""Where data lives. Everything under ``DATA_ROOT`` is generated and git-ignored.

``MOE_DATA_ROOT`` overrides the default ``<repo>/data``. The helpers re-read the environment on every call so
tests (and scripts) can point them elsewhere after import.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"  # the Hydra config tree (the package is installed editable from the repo)
DATA_ROOT = Path(os.environ.get("MOE_DATA_ROOT", REPO_ROOT / "data"))


def data_root() -> Path:
    """``$MOE_DATA_ROOT`` if set (read now, not at import), else ``<repo>/data``."""
    return Path(os.environ.get("MOE_DATA_ROOT", REPO_ROOT / "data"))


def corpus_dir() -> Path:
    """The built multi-domain corpus (a ``datasets.DatasetDict`` saved with ``save_to_disk``)."""
    return data_root() / "corpus"


def tokenizers_dir() -> Path:
    """Cached tokenizer JSON files."""
    return data_root() / "tokenizers"


def raw_dir() -> Path:
    """Raw downloads: ``debs/`` (Debian packages), ``pypi/`` (wheels), generated text."""
    return data_root() / "raw"
