"""Text sources for the embedded corpus: one small function per source, each returning a :class:`SourceText`.

Every source is real text shipped in a Debian package or a PyPI distribution; nothing is
read from the HF hub. A function raises :class:`SourceMissing` when its input is absent (deb not downloaded,
wheel not downloadable); the builder then warns and carries on with the other sources.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import importlib.util
import io
import json
import lzma
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DOC_TARGET_CHARS = 4000  # documents are ~4 KB, split at paragraph boundaries


class SourceMissing(RuntimeError):
    """The raw input of a source is not available on this machine."""


@dataclass
class SourceText:
    """Raw text of one source, as named files in a deterministic (sorted) order."""

    source: str  # short name, e.g. "texlive-science-doc"
    domain: str
    package: str  # where it comes from, e.g. "deb:texlive-science-doc", "pypi:licensedcode-data"
    version: str
    licence: str
    files: list[tuple[str, str]] = field(default_factory=list)  # (name, text)


def decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _maybe_gunzip(name: str, data: bytes) -> tuple[str, bytes]:
    if name.endswith(".gz"):
        return name[:-3], gzip.decompress(data)
    return name, data


# ---------------------------------------------------------------- Debian packages (read without dpkg/root)


def find_deb(debs_dir: Path, package: str) -> Path:
    found = sorted(debs_dir.glob(f"{package}_*.deb"))
    if not found:
        raise SourceMissing(f"{package}_*.deb not in {debs_dir} (run scripts/setup.sh or `apt-get download {package}`)")
    return found[-1]


def _ar_members(deb: Path) -> dict[str, bytes]:
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise SourceMissing(f"{deb} is not a Debian package (no ar header)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def _open_tar(name: str, blob: bytes) -> tarfile.TarFile:
    if name.endswith(".zst"):
        raise SourceMissing(f"{name}: zstd-compressed debs are not supported (no zstd in the stdlib)")
    if name.endswith(".xz"):
        blob = lzma.decompress(blob)
    elif name.endswith(".gz"):
        blob = gzip.decompress(blob)
    return tarfile.open(fileobj=io.BytesIO(blob), mode="r:")


def deb_version(deb: Path) -> str:
    """The ``Version:`` field of the package's control file (what ``dpkg-deb -f <deb> Version`` prints)."""
    members = _ar_members(deb)
    name = next(n for n in members if n.startswith("control.tar"))
    with _open_tar(name, members[name]) as tar:
        for m in tar.getmembers():
            if m.name.lstrip("./") == "control":
                control = decode(tar.extractfile(m).read())  # type: ignore[union-attr]
                found = re.search(r"^Version:\s*(\S+)", control, re.M)
                return found.group(1) if found else "unknown"
    return "unknown"


def deb_files(deb: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the regular files in the deb's data archive whose path matches ``pattern`` (re.search)."""
    members = _ar_members(deb)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise SourceMissing(f"{deb}: no data.tar member")
    rx = re.compile(pattern)
    with _open_tar(name, members[name]) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            path = m.name.lstrip("./")
            if m.isfile() and rx.search(path):
                yield path, tar.extractfile(m).read()  # type: ignore[union-attr]


def deb_extract(deb: Path, dest: Path, pattern: str) -> Path:
    """Write the matching files of a deb under ``dest`` (keeping their paths and exec bits); returns ``dest``."""
    members = _ar_members(deb)
    name = next(n for n in members if n.startswith("data.tar"))
    rx = re.compile(pattern)
    with _open_tar(name, members[name]) as tar:
        for m in tar.getmembers():
            path = m.name.lstrip("./")
            if m.isfile() and rx.search(path):
                target = dest / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
                target.chmod(0o755 if m.mode & 0o111 else 0o644)
    return dest


def _deb_source(debs: Path, package: str, domain: str, licence: str) -> tuple[Path, SourceText]:
    deb = find_deb(debs, package)
    return deb, SourceText(package, domain, f"deb:{package}", deb_version(deb), licence)


# ---------------------------------------------------------------- arxiv


def texlive_latex(debs: Path, package: str) -> SourceText:
    """LaTeX sources (``.tex``/``.ltx``, gzipped or not) of a ``texlive-*-doc`` package."""
    deb, src = _deb_source(debs, package, "arxiv", "LPPL-1.3c (mostly; per-package, all Debian main)")
    for path, data in deb_files(deb, r"^usr/share/doc/texlive-doc/.*\.(tex|ltx)(\.gz)?$"):
        path, data = _maybe_gunzip(path, data)
        src.files.append((path, decode(data)))
    return src


# ---------------------------------------------------------------- github

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}


def python_stdlib(stdlib: Path | None = None) -> SourceText:
    """The running Python's standard library ``.py`` files, without test directories and site-packages."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise SourceMissing(f"Python stdlib not found at {root}")
    src = SourceText("python-stdlib", "github", "python-stdlib", platform.python_version(), "PSF-2.0")
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        src.files.append((str(rel), decode(f.read_bytes())))
    return src


# ---------------------------------------------------------------- gutenberg


def bible_kjv(debs: Path, work: Path) -> SourceText:
    """King James Bible, printed by the ``bible`` program of ``bible-kjv`` run straight from the unpacked debs."""
    prog_deb, text_deb = find_deb(debs, "bible-kjv"), find_deb(debs, "bible-kjv-text")
    src = SourceText(
        "bible-kjv-text",
        "gutenberg",
        "deb:bible-kjv-text",
        deb_version(text_deb),
        "public domain (text); GPL-2+ (package)",
    )
    dest = work / "bible-kjv"
    deb_extract(prog_deb, dest, r"^usr/bin/bible$")
    deb_extract(text_deb, dest, r"^usr/lib/bible\.data")
    try:
        res = subprocess.run(
            [str(dest / "usr/bin/bible"), "-p", str(dest / "usr/lib"), "-f", "gen1:1-rev22:21"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise SourceMissing(f"could not run the bible-kjv `bible` program from {dest}: {e}") from e
    # one verse per line ("Ge1:1 In the beginning ..."); a blank line between chapters
    text = re.sub(r"\n(?=[1-3]?[A-Z][a-z]*\d+:1 )", "\n\n", decode(res.stdout))
    src.files.append(("kjv", text))
    return src


_OSIS_BREAK = re.compile(r"<(?:div|chapter)\b[^>]*\beID=[^>]*/>|</title>|<title\b[^>]*>")
_OSIS_LINE = re.compile(r"<lb\b[^>]*/>|</l>|<l\b[^>]*eID=[^>]*/>")


def world_english_bible(debs: Path, package: str = "sword-text-web") -> SourceText:
    """World English Bible (with Deuterocanon) from the SWORD zText module of ``sword-text-web`` (or the zText
    module of another ``sword-text-*`` package)."""
    deb, src = _deb_source(debs, package, "gutenberg", "public domain")
    files = dict(deb_files(deb, r"/ztext/[^/]+/(ot|nt)\.bz[sz]$"))
    raw = []
    for testament in ("ot", "nt"):
        idx = next(v for k, v in files.items() if k.endswith(f"/{testament}.bzs"))
        data = next(v for k, v in files.items() if k.endswith(f"/{testament}.bzz"))
        for i in range(0, len(idx), 12):
            off, size, _ = struct.unpack("<III", idx[i : i + 12])
            if size:
                raw.append(decode(zlib.decompress(data[off : off + size])))
    osis = re.sub(r"<note\b.*?</note>", "", "".join(raw), flags=re.S)
    osis = _OSIS_LINE.sub("\n", _OSIS_BREAK.sub("\n\n", osis))
    text = html.unescape(re.sub(r"<[^>]+>", "", osis))
    text = re.sub(r"\n[ \t]*\n\s*", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()
    src.files.append(("web", text))
    return src


def jane_austen(debs: Path) -> SourceText:
    """Jane Austen's six novels from ``r-cran-janeaustenr`` (an R lazy-load database, read with ``rdata``)."""
    try:
        import rdata
    except ImportError as e:
        raise SourceMissing("the PyPI package `rdata` is needed to read r-cran-janeaustenr") from e
    deb, src = _deb_source(debs, "r-cran-janeaustenr", "gutenberg", "public domain (texts); MIT (package)")
    files = dict(deb_files(deb, r"/janeaustenr/data/Rdata\.(rdx|rdb)$"))
    rdx = next(v for k, v in files.items() if k.endswith(".rdx"))
    rdb = next(v for k, v in files.items() if k.endswith(".rdb"))
    with warnings.catch_warnings():  # "Unknown file type: assumed RDS": these are bare serialized R objects
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx))
        )
        for name, (off, length) in sorted(index["variables"].items()):
            off, length = int(off), int(length)
            data = zlib.decompress(rdb[off + 4 : off + length])  # 4-byte length, then a zlib stream
            lines = rdata.conversion.convert(rdata.parser.parse_data(data))
            src.files.append((str(name), "\n".join(str(x) for x in lines)))
    return src


# ---------------------------------------------------------------- wikipedia (dictionaries)

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def dictd(debs: Path, package: str, name: str, licence: str, group_chars: int = DOC_TARGET_CHARS) -> SourceText:
    """A dictd database: one entry per definition, consecutive entries grouped into ~``group_chars`` files."""
    deb, src = _deb_source(debs, package, "wikipedia", licence)
    files = dict(deb_files(deb, rf"^usr/share/dictd/{re.escape(name)}\.(index|dict\.dz)$"))
    index, data = files.get(f"usr/share/dictd/{name}.index"), files.get(f"usr/share/dictd/{name}.dict.dz")
    if index is None or data is None:
        raise SourceMissing(f"{deb} has no usr/share/dictd/{name}.index/.dict.dz")
    body = gzip.decompress(data)
    seen: set[tuple[int, int]] = set()
    group: list[str] = []
    size = 0
    for line in decode(index).splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        span = (_b64(parts[1]), _b64(parts[2]))
        if span in seen:  # several headwords can point at one definition
            continue
        seen.add(span)
        entry = decode(body[span[0] : span[0] + span[1]]).strip()
        if not entry:
            continue
        group.append(entry)
        size += len(entry)
        if size >= group_chars:
            src.files.append((f"{name}:{len(src.files):06d}", "\n\n".join(group)))
            group, size = [], 0
    if group:
        src.files.append((f"{name}:{len(src.files):06d}", "\n\n".join(group)))
    return src


# ---------------------------------------------------------------- stackexchange (technical docs)


def python_doc(debs: Path) -> SourceText:
    """reStructuredText sources of the Python 3.11 documentation (``python3.11-doc``)."""
    deb, src = _deb_source(debs, "python3.11-doc", "stackexchange", "PSF-2.0")
    for path, data in deb_files(deb, r"/html/_sources/.*\.rst\.txt$"):
        src.files.append((path, decode(data)))
    return src


def perl_pod(debs: Path) -> SourceText:
    """POD sources of the Perl documentation (``perl-doc``)."""
    deb, src = _deb_source(debs, "perl-doc", "stackexchange", "GPL-1+ or Artistic")
    for path, data in deb_files(deb, r"^usr/share/perl/[^/]+/pod/[^/]+\.pod(\.gz)?$"):
        path, data = _maybe_gunzip(path, data)
        src.files.append((path, decode(data)))
    return src


# ---------------------------------------------------------------- freelaw (licence texts)

LICENSEDCODE = "licensedcode-data"
LICENSEDCODE_PIN = "32.1.0"


def fetch_wheel(pypi_dir: Path, project: str, version: str | None = None) -> Path:
    """A wheel of ``project`` in ``pypi_dir``, downloaded with ``pip download --no-deps`` if not there yet."""
    stem = project.replace("-", "_")
    found = sorted(pypi_dir.glob(f"{stem}-*.whl"))
    if version:
        found = [w for w in found if w.name.startswith(f"{stem}-{version}-")] or found
    if found:
        return found[-1]
    pypi_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for spec in ([f"{project}=={version}"] if version else []) + [project]:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(pypi_dir),
            spec,
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(str(e))
            continue
        found = sorted(pypi_dir.glob(f"{stem}-*.whl"))
        if res.returncode == 0 and found:
            return found[-1]
        errors.append(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"pip exit {res.returncode}")
    raise SourceMissing(f"could not download the {project} wheel with pip: {'; '.join(errors)}")


def licence_texts(pypi_dir: Path) -> SourceText:
    """Full licence texts (``licensedcode/data/licenses/*.LICENSE``) of ScanCode's ``licensedcode-data`` wheel."""
    wheel = fetch_wheel(pypi_dir, LICENSEDCODE, LICENSEDCODE_PIN)
    version = wheel.name.split("-")[1]
    src = SourceText(LICENSEDCODE, "freelaw", f"pypi:{LICENSEDCODE}", version, "CC-BY-4.0 (ScanCode licensedcode data)")
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(n for n in zf.namelist() if re.search(r"licensedcode/data/licenses/[^/]+\.LICENSE$", n)):
            text = decode(zf.read(name))
            if text.startswith("---"):  # YAML front matter
                end = text.find("\n---", 3)
                text = text[end + 4 :] if end >= 0 else text
            src.files.append((name.rsplit("/", 1)[-1], text.strip("\n")))
    return src


# ---------------------------------------------------------------- dm_mathematics (generated)

# Fixes for mathematics-dataset 1.0.1 (2019), applied to a copy: {file: [(regex, replacement), ...]}.
MATH_PATCHES = {
    "sample/polynomials.py": [
        (r"(\w+)\.itemset\(([^,]+), (\w+)\)", r"\1[\2] = \3"),  # ndarray.itemset was removed in numpy 2
        (r"np\.object\b", "object"),  # np.object was removed in numpy 1.24
        (
            r"from sympy\.solvers\.diophantine import base_solution_linear",  # moved in sympy 1.6
            "from sympy.solvers.diophantine.diophantine import base_solution_linear",
        ),
    ],
    # Determinism: composed questions collect their entities in a set of objects hashed by id(), so the order
    # of the "Let ..." statements depended on memory addresses. An insertion-ordered dict keeps it seeded.
    "util/composition.py": [
        (r"entities = set\(context\.child_entities\)", "entities = dict.fromkeys(context.child_entities)"),
        (r"entities\.add\(maybe_entity\)", "entities[maybe_entity] = None"),
    ],
}

_MATH_DRIVER = r"""
import json, random, sys, zlib
import numpy as np
import sympy.core.random
from mathematics_dataset import generate_settings
from mathematics_dataset.modules import modules
args = json.loads(sys.argv[1])
levels = ["easy", "medium", "hard"]
def entropy_fn(level):
    lo, hi = level / 3, (level + 1) / 3
    return lambda r: (r[0] + lo * (r[1] - r[0]), r[0] + hi * (r[1] - r[0]))
def flatten(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flatten(v, prefix + k + "__")
        else:
            yield prefix + k, v
jobs = []
for li, level in enumerate(levels):
    jobs += [(f"train-{level}/{name}", fn) for name, fn in flatten(modules.train(entropy_fn(li)))]
jobs.sort(key=lambda j: j[0])
with open(args["out"] + ".tmp", "w", encoding="utf-8") as out:
    for name, fn in jobs[args["worker"]::args["workers"]]:
        seed = (args["seed"] * 1000003 + zlib.crc32(name.encode())) % 2**32
        random.seed(seed); np.random.seed(seed); sympy.core.random.seed(seed)  # sympy has its own RNG
        lines, n = [], 0
        while n < args["per_module"]:
            problem = fn()
            q, a = str(problem.question), str(problem.answer)
            if len(q) > generate_settings.MAX_QUESTION_LENGTH or len(a) > generate_settings.MAX_ANSWER_LENGTH:
                continue
            lines.append(q + "\n" + a)
            n += 1
        out.write(json.dumps({"name": name, "text": "\n\n".join(lines)}) + "\n")
"""


def patched_mathematics_dataset(work: Path) -> Path:
    """A copy of the installed ``mathematics_dataset`` with :data:`MATH_PATCHES` applied; returns its parent dir."""
    spec = importlib.util.find_spec("mathematics_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissing("the PyPI package `mathematics-dataset` is not installed")
    pkg = Path(list(spec.submodule_search_locations)[0])
    root = work / "mdpatch"
    dest = root / "mathematics_dataset"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(pkg, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, patches in MATH_PATCHES.items():
        path = dest / rel
        code = path.read_text(encoding="utf-8")
        for pattern, repl in patches:
            code, n = re.subn(pattern, repl, code, flags=re.M)
            if n == 0:
                raise SourceMissing(
                    f"mathematics_dataset patch {pattern!r} does not apply to {rel}: "
                    f"unexpected mathematics-dataset version"
                )
        path.write_text(code, encoding="utf-8")
    return root


def start_dm_mathematics(work: Path, per_module: int, seed: int = 0, workers: int = 2) -> Callable[[], SourceText]:
    """Start generating DeepMind Mathematics questions in ``workers`` processes; returns a function that waits.

    Each train module at each difficulty (easy/medium/hard) gets ``per_module`` question/answer pairs generated
    with a seed derived from ``seed`` and the module name, so the output does not depend on the worker split.
    Results are cached under ``work/dm_mathematics``.
    """
    out_dir = work / "dm_mathematics"
    out_dir.mkdir(parents=True, exist_ok=True)
    code = hashlib.sha256((_MATH_DRIVER + repr(MATH_PATCHES)).encode()).hexdigest()[:8]
    key = f"s{seed}-n{per_module}-w{workers}-{code}"
    outs = [out_dir / f"{key}-{w}.jsonl" for w in range(workers)]
    procs = []
    if not all(o.is_file() for o in outs):
        root = patched_mathematics_dataset(work)
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": "0"}
        for w, out in enumerate(outs):
            args = json.dumps(
                {"out": str(out), "worker": w, "workers": workers, "seed": seed, "per_module": per_module}
            )
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-c", _MATH_DRIVER, args],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                    out,
                )
            )

    def wait() -> SourceText:
        errors = []
        for proc, out in procs:
            _, err = proc.communicate()
            if proc.returncode == 0:
                Path(str(out) + ".tmp").replace(out)
            else:
                errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
        if errors:
            raise SourceMissing(f"mathematics_dataset generation failed: {'; '.join(errors)}")
        src = SourceText(
            "mathematics-dataset",
            "dm_mathematics",
            "pypi:mathematics-dataset",
            _dist_version("mathematics-dataset"),
            "Apache-2.0",
        )
        items = [json.loads(line) for out in outs for line in out.read_text(encoding="utf-8").splitlines()]
        src.files = sorted((it["name"], it["text"]) for it in items)
        return src

    return wait


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
