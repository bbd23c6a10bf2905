"""Run names that stay unique for any swept key, and W&B tags that say the swept values.

A run is named ``<router>-s<seed>``, followed by the run's other command-line overrides as Hydra writes them in
``hydra.job.override_dirname`` (sorted, ``key=value`` joined by ``,``; keys listed in
``hydra.job.config.override_dirname.exclude_keys`` left out)::

    moe-train router=hash                                  -> hash-s0
    moe-train -m router=hash router.table=random,balanced  -> hash-s0,router.table=random  hash-s0,router.table=balanced

``conf/config.yaml`` builds ``name`` with the ``moe.run_name`` resolver registered here (on import of this module:
``training.run`` and ``training.build`` import it before Hydra resolves the run dir).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

RESOLVER = "moe.run_name"
MAX_NAME_BYTES = 200  # a run name is one folder name (255 bytes on common file systems) and a W&B run name
MAX_TAG_CHARS = 64  # W&B's limit for one tag


def run_name(router: str, seed: int | str, overrides: str = "") -> str:
    """``<router>-s<seed>[,<overrides>]``: one folder name (``/`` in override values becomes ``_``); names longer
    than ``MAX_NAME_BYTES`` are cut and end in a hash of the whole name, so they stay unique."""
    name = f"{router}-s{seed}" + (f",{overrides}" if overrides else "")
    name = name.replace("/", "_")
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = name.encode()[: MAX_NAME_BYTES - 13].decode(errors="ignore") + "-" + digest
    return name


def override_tags(task_overrides: Sequence[str], exclude_keys: Sequence[str]) -> list[str]:
    """W&B tags for the run's overrides that are part of its name (``router.table=random``), each at most
    ``MAX_TAG_CHARS`` long; the same keys as ``hydra.job.override_dirname`` leaves out are left out here."""
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    excluded = set(exclude_keys)
    return sorted(o.input_line[:MAX_TAG_CHARS] for o in parsed if o.key_or_group not in excluded and o.input_line)


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, run_name)
