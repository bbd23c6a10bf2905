"""``moe-data``: build the embedded multi-domain corpus (Pile-domain stand-ins from Debian/PyPI packages).

Output: a ``datasets.DatasetDict`` (``train``/``validation``; columns ``text``, ``domain``, ``source``) saved
with ``save_to_disk`` at ``DATA_ROOT/corpus``, plus ``manifest.json`` (per source: package, version, licence,
bytes, sha256, docs). The build is deterministic: sorted file lists, hash-ordered selection under a per-domain
byte cap, a hash-ranked ~5% validation split per domain, fixed seeds for the generated maths.

    moe-data                                    # all domains, ~4 MB each; a no-op if the corpus exists
    moe-data --domains github,arxiv --max-bytes-per-domain 1000000 --out /tmp/corpus --force
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from moe_variants import paths
from moe_variants.data import sources as S

DOMAINS = ("arxiv", "dm_mathematics", "freelaw", "github", "gutenberg", "stackexchange", "wikipedia")
DEFAULT_MAX_BYTES = 4_000_000
VALIDATION_FRACTION = 0.05
MATH_PER_MODULE = 32  # question/answer pairs per train module and difficulty: ~0.4 MB


def domain_sources(domain: str, raw: Path) -> list[Callable[[], S.SourceText]]:
    """The source readers of one domain (``dm_mathematics`` is generated separately, see :func:`build_corpus`)."""
    debs, work = raw / "debs", raw / "work"
    table: dict[str, list[Callable[[], S.SourceText]]] = {
        "arxiv": [
            partial(S.texlive_latex, debs, "texlive-science-doc"),
            partial(S.texlive_latex, debs, "texlive-latex-recommended-doc"),
        ],
        "github": [S.python_stdlib],
        "gutenberg": [
            partial(S.bible_kjv, debs, work),
            partial(S.world_english_bible, debs),
            partial(S.jane_austen, debs),
        ],
        "wikipedia": [
            partial(S.dictd, debs, "dict-foldoc", "foldoc", "GFDL-1.1+"),
            partial(S.dictd, debs, "dict-gcide", "gcide", "GPL-2+"),
            partial(S.dictd, debs, "dict-wn", "wn", "WordNet-3.0"),
        ],
        "stackexchange": [partial(S.python_doc, debs), partial(S.perl_pod, debs)],
        "freelaw": [partial(S.licence_texts, raw / "pypi")],
        "dm_mathematics": [],
    }
    return table[domain]


# Debian packages the corpus reads (scripts/setup.sh downloads them into DATA_ROOT/raw/debs).
DEB_PACKAGES = (
    "texlive-science-doc",
    "texlive-latex-recommended-doc",
    "bible-kjv",
    "bible-kjv-text",
    "sword-text-web",
    "r-cran-janeaustenr",
    "dict-foldoc",
    "dict-gcide",
    "dict-wn",
    "python3.11-doc",
    "perl-doc",
)


# ---------------------------------------------------------------- documents


def _cut(block: str, target: int) -> Iterator[str]:
    """An oversized paragraph, cut at line ends (and long lines at ``target`` characters)."""
    if len(block) <= 2 * target:
        yield block
        return
    cur = ""
    for line in block.splitlines(keepends=True):
        while len(line) > target:
            if cur:
                yield cur
                cur = ""
            yield line[:target]
            line = line[target:]
        if len(cur) + len(line) > target and cur:
            yield cur
            cur = ""
        cur += line
    if cur:
        yield cur


def split_documents(text: str, target: int = S.DOC_TARGET_CHARS) -> list[str]:
    """Split a file into documents of about ``target`` characters at paragraph (blank line) boundaries.

    Documents are the concatenation of whole paragraphs (cut further only when a paragraph is over twice the
    target), stripped of surrounding blank lines; empty documents are dropped.
    """
    import re

    docs, cur, n, pos = [], [], 0, 0
    ends = [m.end() for m in re.finditer(r"\n[ \t]*\n", text)] + [len(text)]
    for end in ends:
        for block in _cut(text[pos:end], target):
            cur.append(block)
            n += len(block)
            if n >= target:
                docs.append("".join(cur))
                cur, n = [], 0
        pos = end
    if cur:
        docs.append("".join(cur))
    out = []
    for d in docs:
        d = d.strip("\n").rstrip()
        if d.strip():
            out.append(d)
    return out


def _h(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8", errors="surrogatepass")).hexdigest()


def shares(sizes: Sequence[int], cap: int) -> list[int]:
    """Split a byte budget over sources: equal shares, a small source's unused share going to the others."""
    out = [0] * len(sizes)
    remaining = cap
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    for k, i in enumerate(order):
        out[i] = min(sizes[i], remaining // (len(sizes) - k))
        remaining -= out[i]
    return out


@dataclass
class Selected:
    src: S.SourceText
    docs: list[str]
    available_bytes: int
    files_used: int


def select_docs(src: S.SourceText, budget: int) -> Selected:
    """Documents of one source up to ``budget`` bytes: whole files in hash order, each split into documents."""
    files = sorted(src.files, key=lambda f: (_h(f"{src.source}/{f[0]}"), f[0]))
    total = sum(len(t.encode("utf-8")) for _, t in src.files)
    docs: list[str] = []
    used, n_files = 0, 0
    for _, text in files:
        taken = 0
        for doc in split_documents(text):
            size = len(doc.encode("utf-8"))
            if used + size > budget:
                return Selected(src, docs, total, n_files + (taken > 0))
            docs.append(doc)
            used += size
            taken += 1
        n_files += taken > 0
    return Selected(src, docs, total, n_files)


def validation_flags(docs: Sequence[str], fraction: float = VALIDATION_FRACTION) -> list[bool]:
    """True for the ``round(fraction * n)`` (at least one when n >= 2) docs with the smallest content hash."""
    n = len(docs)
    if n < 2:
        return [False] * n
    n_val = max(1, round(fraction * n))
    ranked = sorted(range(n), key=lambda i: (_h(docs[i]), i))
    val = set(ranked[:n_val])
    return [i in val for i in range(n)]


# ---------------------------------------------------------------- build


def _warn(msg: str) -> None:
    print(f"moe-data: WARNING: {msg}", file=sys.stderr, flush=True)


def build_corpus(
    out: str | os.PathLike[str] | None = None,
    domains: Sequence[str] | None = None,
    max_bytes_per_domain: int = DEFAULT_MAX_BYTES,
    raw: str | os.PathLike[str] | None = None,
    force: bool = False,
    math_per_module: int = MATH_PER_MODULE,
    seed: int = 0,
) -> dict:
    """Build the corpus (see module docstring) and return its manifest. A no-op if it exists and not ``force``."""
    out = Path(out) if out else paths.corpus_dir()
    raw = Path(raw) if raw else paths.raw_dir()
    domains = sorted(set(domains or DOMAINS))
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; available: {', '.join(DOMAINS)}")
    manifest_path = out / "manifest.json"
    if not force and (out / "dataset_dict.json").is_file() and manifest_path.is_file():
        print(f"moe-data: corpus already at {out} (use --force to rebuild)")
        return json.loads(manifest_path.read_text())

    t0 = time.time()
    (raw / "work").mkdir(parents=True, exist_ok=True)
    math_wait = None
    if "dm_mathematics" in domains:  # slow: runs in 2 processes while the other domains are read
        try:
            math_wait = S.start_dm_mathematics(raw / "work", math_per_module, seed=seed)
        except S.SourceMissing as e:
            _warn(f"skipping source mathematics-dataset (domain dm_mathematics): {e}")

    records: dict[str, list[Selected]] = {}
    for domain in sorted(domains, key=lambda d: d == "dm_mathematics"):  # the generated one last: it is waited on
        readers = list(domain_sources(domain, raw))
        if domain == "dm_mathematics" and math_wait is not None:
            readers.append(math_wait)
        texts = []
        for reader in readers:
            name = (
                getattr(reader, "args", ("",))[-1] if isinstance(reader, partial) else getattr(reader, "__name__", "")
            )
            try:
                t = time.time()
                texts.append(reader())
                print(f"moe-data: read {texts[-1].source} ({domain}) in {time.time() - t:.1f}s", flush=True)
            except S.SourceMissing as e:
                _warn(f"skipping a {domain} source ({name}): {e}")
            except Exception as e:  # a broken package must not take the other domains down
                _warn(f"skipping a {domain} source ({name}): {type(e).__name__}: {e}")
        texts = [t for t in texts if t.files]
        if not texts:
            _warn(f"domain {domain!r} has no source available: it is left out of the corpus")
            continue
        sizes = [sum(len(x.encode("utf-8")) for _, x in t.files) for t in texts]
        selected = [select_docs(t, b) for t, b in zip(texts, shares(sizes, max_bytes_per_domain))]
        seen: set[str] = set()
        for sel in selected:  # exact duplicates (e.g. identical licence texts) would leak across splits
            sel.docs = [d for d in sel.docs if not (d in seen or seen.add(d))]  # type: ignore[func-returns-value]
        if sum(len(s.docs) for s in selected):
            records[domain] = selected
    if not records:
        raise RuntimeError(
            "moe-data: no source could be read, nothing was built. Download the Debian packages first "
            f"(scripts/setup.sh, or `apt-get download {' '.join(DEB_PACKAGES)}` in {raw / 'debs'}) and check "
            "that pip can reach PyPI."
        )

    import datasets

    datasets.disable_progress_bars()
    rows: dict[str, dict[str, list[str]]] = {
        s: {"text": [], "domain": [], "source": []} for s in ("train", "validation")
    }
    manifest: dict = {
        "format": 1,
        "max_bytes_per_domain": max_bytes_per_domain,
        "validation_fraction": VALIDATION_FRACTION,
        "math_per_module": math_per_module,
        "seed": seed,
        "sources": [],
        "domains": {},
    }
    for domain, selected in sorted(records.items()):
        docs = [(d, sel.src.source) for sel in selected for d in sel.docs]
        flags = validation_flags([d for d, _ in docs])
        stats = {"train": {"docs": 0, "bytes": 0}, "validation": {"docs": 0, "bytes": 0}}
        for (doc, source), is_val in zip(docs, flags):
            split = "validation" if is_val else "train"
            rows[split]["text"].append(doc)
            rows[split]["domain"].append(domain)
            rows[split]["source"].append(source)
            stats[split]["docs"] += 1
            stats[split]["bytes"] += len(doc.encode("utf-8"))
        manifest["domains"][domain] = stats
        for sel in selected:
            blob = "\x00".join(sel.docs).encode("utf-8")
            manifest["sources"].append(
                {
                    "source": sel.src.source,
                    "domain": domain,
                    "package": sel.src.package,
                    "version": sel.src.version,
                    "licence": sel.src.licence,
                    "bytes": sum(len(d.encode("utf-8")) for d in sel.docs),
                    "available_bytes": sel.available_bytes,
                    "files_used": sel.files_used,
                    "files": len(sel.src.files),
                    "docs": len(sel.docs),
                    "sha256": hashlib.sha256(blob).hexdigest(),
                }
            )
    manifest["corpus_sha256"] = hashlib.sha256(
        json.dumps([manifest["sources"], manifest["domains"]], sort_keys=True).encode()
    ).hexdigest()
    features = datasets.Features({k: datasets.Value("string") for k in ("text", "domain", "source")})
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(r, features=features) for s, r in rows.items()})
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    dd.save_to_disk(str(tmp))
    manifest["build_seconds"] = round(time.time() - t0, 1)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out)
    missing = [d for d in domains if d not in records]
    print(summary(manifest) + (f"\nmissing domains: {', '.join(missing)}" if missing else ""))
    print(f"moe-data: wrote {out} in {manifest['build_seconds']}s")
    return manifest


def summary(manifest: dict) -> str:
    """A small table: bytes and docs per domain and split, and per source."""
    lines = [f"{'domain':<15}{'train docs':>11}{'train MB':>10}{'val docs':>10}{'val MB':>9}"]
    for d, st in sorted(manifest["domains"].items()):
        lines.append(
            f"{d:<15}{st['train']['docs']:>11}{st['train']['bytes'] / 1e6:>10.2f}"
            f"{st['validation']['docs']:>10}{st['validation']['bytes'] / 1e6:>9.2f}"
        )
    lines.append(f"{'source':<32}{'version':<26}{'docs':>6}{'MB':>7}{'of MB':>8}")
    for s in manifest["sources"]:
        lines.append(
            f"{s['source']:<32}{s['version'][:25]:<26}{s['docs']:>6}{s['bytes'] / 1e6:>7.2f}"
            f"{s['available_bytes'] / 1e6:>8.2f}"
        )
    return "\n".join(lines)


SUBCOMMANDS = {  # `moe-data <sub> ...`: the large shard corpus and its transport
    "large": "moe_variants.data.large",
    "pack": "moe_variants.data.transport",
    "unpack": "moe_variants.data.transport",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return module.main(argv[1:]) if argv[0] == "large" else module.main(argv)
    p = argparse.ArgumentParser(
        prog="moe-data",
        description=__doc__.split("\n\n")[0],
        epilog="Subcommands: `moe-data large --help` (the large tokenized shard corpus), `moe-data pack --help` / "
        "`moe-data unpack --help` (move shards as checksummed pieces).",
    )
    p.add_argument("--domains", default=",".join(DOMAINS), help=f"comma-separated subset of {','.join(DOMAINS)}")
    p.add_argument("--max-bytes-per-domain", type=lambda s: int(float(s)), default=DEFAULT_MAX_BYTES)
    p.add_argument("--out", default=None, help="output directory (default $MOE_DATA_ROOT/corpus)")
    p.add_argument("--raw", default=None, help="raw downloads directory (default $MOE_DATA_ROOT/raw)")
    p.add_argument(
        "--math-per-module",
        type=int,
        default=MATH_PER_MODULE,
        help="dm_mathematics question/answer pairs per module and difficulty",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the corpus exists")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        build_corpus(
            a.out,
            [d.strip() for d in a.domains.split(",") if d.strip()],
            a.max_bytes_per_domain,
            a.raw,
            a.force,
            a.math_per_module,
            a.seed,
        )
    except (ValueError, RuntimeError) as e:
        print(f"moe-data: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
