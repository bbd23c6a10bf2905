"""``moe-data pack`` / ``unpack``: move a shard corpus as compressed pieces of bounded size, with checksums.

``pack`` writes ``pack.json`` (every file: size, sha256, and its pieces: offset, raw size, sha256 of the piece)
and ``piece-NNNNN.zz`` files (zlib streams, each at most ``--max-bytes``). Pieces are ordered so that
``index.json``, the manifest and the validation streams come first, then the training shards one after the
other: a receiver that has the first pieces can ``unpack`` and train on the shards complete so far
(``data.allow_partial=true``), and run ``unpack`` again as more arrive (finished files are kept).

    moe-data pack --src data/corpus_large --out /tmp/pieces --max-bytes 64MiB
    moe-data unpack --src /tmp/pieces --out data/corpus_large
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from moe_variants.data import shards

PACK_FORMAT = "moe-pack-1"
MANIFEST = "pack.json"


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]i?b?|b)?\s*", s.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}: use e.g. 64MiB, 50MB, 1000000")
    mult = {None: 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9,
            "gb": 1e9, "gib": 2**30, "ki": 2**10, "mi": 2**20, "gi": 2**30}[m.group(2)]
    return int(float(m.group(1)) * mult)


def _order(src: Path) -> list[Path]:
    """Files of a shard corpus in sending order: description and validation first, then shard by shard."""
    index = shards.read_index(src)
    first = [src / shards.INDEX] + ([src / "manifest.json"] if (src / "manifest.json").is_file() else [])
    val = [src / "validation" / f"{d}{ext}" for d in sorted(index["validation"]) for ext in (".docs.npy", ".tokens")]
    train = [src / "train" / f"{s['name']}{ext}" for s in index["train"] for ext in (".docs.npy", ".tokens")]
    return first + val + train


def raw_chunk(max_bytes: int) -> int:
    """Raw bytes per piece such that the zlib stream cannot exceed ``max_bytes`` (deflate's worst case adds
    5 bytes per 16 KiB stored block, plus a header and checksum)."""
    chunk = max_bytes - 64 - (max_bytes // 16384 + 1) * 5
    if chunk < 1024:
        raise ValueError(f"--max-bytes {max_bytes} is too small (at least a few KiB)")
    return chunk


def pack(src: Path, out: Path, max_bytes: int = 64 * 2**20, level: int = 6, log=print) -> dict:
    files = _order(src)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{src} is incomplete ({missing[:3]}…): pack a complete corpus")
    out.mkdir(parents=True, exist_ok=True)
    chunk = raw_chunk(max_bytes)
    entries, k, t0, total_raw, total_packed = [], 0, time.time(), 0, 0
    for f in files:
        rel = f.relative_to(src).as_posix()
        fh = hashlib.sha256()
        pieces = []
        with open(f, "rb") as fin:
            offset = 0
            while True:
                data = fin.read(chunk)
                if not data and offset > 0:
                    break
                fh.update(data)
                packed = zlib.compress(data, level)
                assert len(packed) <= max_bytes
                name = f"piece-{k:05d}.zz"
                (out / (name + ".tmp")).write_bytes(packed)
                os.replace(out / (name + ".tmp"), out / name)
                pieces.append({"name": name, "offset": offset, "raw_bytes": len(data), "bytes": len(packed),
                               "sha256": hashlib.sha256(packed).hexdigest()})
                k += 1
                offset += len(data)
                total_packed += len(packed)
                if not data:
                    break
        total_raw += offset
        entries.append({"path": rel, "bytes": offset, "sha256": fh.hexdigest(), "pieces": pieces})
        log(f"moe-data pack: {rel} -> {len(pieces)} piece(s) ({total_raw / 2**20:.0f} MiB read, "
            f"{time.time() - t0:.0f}s)")
    manifest = {"format": PACK_FORMAT, "max_bytes": max_bytes, "files": entries, "raw_bytes": total_raw,
                "packed_bytes": total_packed, "pieces": k}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"moe-data pack: {k} pieces, {total_packed / 2**20:.1f} MiB from {total_raw / 2**20:.1f} MiB "
        f"(at most {max_bytes / 2**20:.1f} MiB each) in {time.time() - t0:.0f}s -> {out}")
    return manifest


def unpack(src: Path, out: Path, log=print) -> dict:
    """Reassemble every file whose pieces are all present and intact; returns a summary.

    A piece with a wrong checksum is an error (it was damaged in transit: send it again); a missing piece only
    leaves its file for a later run.
    """
    mpath = src / MANIFEST
    if not mpath.is_file():
        raise ValueError(f"no {MANIFEST} in {src}: send it first (it lists the pieces and their checksums)")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != PACK_FORMAT:
        raise ValueError(f"{mpath}: format {manifest.get('format')!r}, expected {PACK_FORMAT!r}")
    done, waiting, t0 = [], [], time.time()
    for e in manifest["files"]:
        dest = out / e["path"]
        if dest.is_file() and dest.stat().st_size == e["bytes"] and shards.sha256_file(dest) == e["sha256"]:
            done.append(e["path"])
            continue
        if not all((src / p["name"]).is_file() for p in e["pieces"]):
            waiting.append(e["path"])
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        fh = hashlib.sha256()
        with open(tmp, "wb") as fout:
            for p in e["pieces"]:
                packed = (src / p["name"]).read_bytes()
                if hashlib.sha256(packed).hexdigest() != p["sha256"]:
                    tmp.unlink()
                    raise ValueError(f"piece {p['name']} of {e['path']} is damaged (sha256 mismatch): send it again")
                data = zlib.decompress(packed)
                if len(data) != p["raw_bytes"]:
                    tmp.unlink()
                    raise ValueError(f"piece {p['name']} of {e['path']} decompressed to {len(data)} bytes, "
                                     f"expected {p['raw_bytes']}: send it again")
                fh.update(data)
                fout.write(data)
        if fh.hexdigest() != e["sha256"]:
            tmp.unlink()
            raise ValueError(f"{e['path']}: reassembled file does not match its sha256: send its pieces again")
        os.replace(tmp, dest)
        done.append(e["path"])
    n_shards = sum(1 for e in manifest["files"] if e["path"].startswith("train/") and e["path"].endswith(".tokens"))
    ready = sum(1 for p in done if p.startswith("train/") and p.endswith(".tokens")
                and p.replace(".tokens", ".docs.npy") in done)
    summary = {"files_done": len(done), "files_waiting": len(waiting), "train_shards_ready": ready,
               "train_shards": n_shards, "complete": not waiting}
    log(f"moe-data unpack: {len(done)}/{len(manifest['files'])} files ready, {ready}/{n_shards} training shards "
        f"({time.time() - t0:.0f}s)" + ("" if not waiting else
                                         f"; waiting for pieces of {len(waiting)} file(s): train on what is there "
                                         "with data.allow_partial=true, run unpack again as pieces arrive"))
    return summary


def main(argv: Sequence[str]) -> int:
    cmd, rest = argv[0], list(argv[1:])
    p = argparse.ArgumentParser(prog=f"moe-data {cmd}", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="the corpus (pack) or the folder of pieces (unpack)")
    p.add_argument("--out", required=True, help="the folder of pieces (pack) or the corpus (unpack)")
    if cmd == "pack":
        p.add_argument("--max-bytes", type=parse_size, default=64 * 2**20, help="largest piece (default 64MiB)")
        p.add_argument("--level", type=int, default=6, help="zlib compression level")
    a = p.parse_args(rest)
    try:
        if cmd == "pack":
            pack(Path(a.src), Path(a.out), a.max_bytes, a.level)
            return 0
        summary = unpack(Path(a.src), Path(a.out))
        return 0 if summary["complete"] else 3
    except (ValueError, FileNotFoundError) as e:
        print(f"moe-data: error: {e}", file=sys.stderr)
        return 1
