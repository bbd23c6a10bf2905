"""Text out of one pinned package: its files (by path regex), converted to plain text, as named texts.

Formats: plain text, gzip, HTML (the main content of the page, without navigation, scripts and styles), troff
man pages (macros dropped, font escapes removed), plus the special readers of ``sources.py`` (dictd databases,
SWORD Bibles, the KJV ``bible`` program, Jane Austen's R data, generated mathematics).
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import re
import tarfile
import zipfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from moe_variants.data import sources as S
from moe_variants.data.pins import Pin, find_deb_file

REPLACEMENT_SHARE = 0.01  # files with more U+FFFD than this (binary, wrong encoding) are skipped
MAX_MEAN_LINE = 400  # minified code / data blobs: skipped


# ---------------------------------------------------------------- formats


class _HTMLText(HTMLParser):
    """Text of an HTML page: only inside the main region (``<main>``, ``role="main"``, ``<article>``) when the
    page has one; block elements become line breaks, ``<pre>`` keeps its layout."""

    SKIP = {"script", "style", "nav", "header", "footer", "noscript", "svg", "button", "form", "head", "title"}
    BLOCK = {"p", "div", "section", "article", "main", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "pre",
             "h1", "h2", "h3", "h4", "h5", "h6", "br", "blockquote", "hr", "td", "th", "figure", "caption"}
    VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.main_out: list[str] = []
        self.skip = 0
        self.pre = 0
        self.main_depth = 0  # > 0 while inside the main region
        self.stack: list[tuple[str, bool]] = []  # (tag, whether it opened a skipped region)

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        if tag in self.VOID:
            if tag in ("br", "hr"):
                self._emit("\n")
            return
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        skipped = tag in self.SKIP or "sphinxsidebar" in classes or "related" in classes
        self.stack.append((tag, skipped))
        if self.main_depth:
            self.main_depth += 1
        elif tag in ("main", "article") or a.get("role") == "main" or a.get("itemprop") == "articleBody":
            self.main_depth = 1
        if skipped:
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self._emit("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "section", "table") else "\n")
        if tag in ("h1", "h2", "h3", "h4"):
            self._emit("#" * int(tag[1]) + " ")

    def handle_endtag(self, tag):  # noqa: ANN001
        if tag in self.VOID or all(t != tag for t, _ in self.stack):
            return
        while self.stack:  # close unclosed children too
            t, skipped = self.stack.pop()
            if skipped:
                self.skip -= 1
            if t == "pre":
                self.pre = max(0, self.pre - 1)
            if self.main_depth:
                self.main_depth -= 1
            if t == tag:
                break
        if tag in self.BLOCK:
            self._emit("\n")

    def handle_data(self, data):  # noqa: ANN001
        if self.skip:
            return
        self._emit(data if self.pre else re.sub(r"\s+", " ", data))

    def _emit(self, s: str) -> None:
        if self.skip and s.strip():
            return
        self.out.append(s)
        if self.main_depth:
            self.main_out.append(s)

    def text(self) -> str:
        body = "".join(self.main_out) if "".join(self.main_out).strip() else "".join(self.out)
        lines = [ln.rstrip() for ln in body.splitlines()]
        text = "\n".join(ln if ln.strip() else "" for ln in lines)
        return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_to_text(page: str) -> str:
    p = _HTMLText()
    try:
        p.feed(page)
        p.close()
    except Exception:  # malformed markup: keep what was parsed
        pass
    return p.text()


_TROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_TROFF_CHAR = {r"\-": "-", r"\e": "\\", r"\&": "", r"\(em": "—", r"\(en": "–", r"\(bu": "•", r"\(aq": "'",
               r"\(dq": '"', r"\(lq": "“", r"\(rq": "”", r"\~": " ", r"\ ": " ", r"\|": "", r"\^": "", r"\:": ""}


def troff_to_text(src: str) -> str:
    """A man page's text: section headings kept, formatting requests and font escapes removed."""
    out: list[str] = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            req, _, arg = line[1:].strip().partition(" ")
            arg = arg.strip().replace('"', "")
            if req in ("SH", "SS"):
                out += ["", arg.upper() if req == "SH" else arg]
            elif req in ("PP", "LP", "P", "TP", "IP", "sp", "HP"):
                out.append("")
                if req == "IP" and arg:
                    out.append(arg)
            elif req in ("B", "I", "SM", "SB", "BR", "BI", "IB", "IR", "RB", "RI", "TH", "UR", "MT"):
                out.append(arg)
            elif req == "so":
                return ""  # a link to another page
            continue
        out.append(line)
    text = _TROFF_FONT.sub("", "\n".join(out))
    for k, v in _TROFF_CHAR.items():
        text = text.replace(k, v)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def to_text(path: str, data: bytes) -> tuple[str, str]:
    """(path without .gz, plain text) of one packaged file."""
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib_error()):
            return path, ""
        path = path[:-3]
    text = S.decode(data)
    if re.search(r"\.x?html?$", path):
        return path, html_to_text(text)
    if re.search(r"/man/[^/]*man\d[^/]*/[^/]+\.\d\w*$", path):
        return path, troff_to_text(text)
    return path, text


def zlib_error():  # noqa: ANN201
    import zlib

    return zlib.error


def usable(text: str) -> bool:
    """Not binary, not minified: enough real lines."""
    if not text.strip():
        return False
    if text.count("\ufffd") > REPLACEMENT_SHARE * len(text) or "\x00" in text:
        return False
    lines = text.count("\n") + 1
    return len(text) / lines <= MAX_MEAN_LINE


# ---------------------------------------------------------------- archives


def _deb_data(deb: Path) -> tuple[str, bytes]:
    members = S._ar_members(deb)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise S.SourceMissing(f"{deb}: no data.tar member")
    return name, members[name]


def _stream_tar(blob: bytes | io.IOBase, compression: str) -> tarfile.TarFile:
    if compression.endswith(".zst"):
        raise S.SourceMissing("zstd-compressed data is not supported (no zstd in the stdlib)")
    fileobj = io.BytesIO(blob) if isinstance(blob, bytes) else blob
    if compression.endswith(".xz"):
        fileobj = lzma.LZMAFile(fileobj)
        return tarfile.open(fileobj=fileobj, mode="r|")
    return tarfile.open(fileobj=fileobj, mode="r|*")


COPYRIGHT = re.compile(r"^usr/share/doc/[^/]+/copyright$")


def _tar_files(tar: tarfile.TarFile, rx: re.Pattern, ex: re.Pattern | None, max_bytes: int,
               found: dict[str, bytes] | None = None) -> Iterator[tuple[str, bytes]]:
    for m in tar:  # archive order: deterministic for one file, and streams without random access
        path = m.name.lstrip("./")
        if found is not None and m.isfile() and COPYRIGHT.search(path):  # the licence, in the same pass
            found.setdefault("copyright", tar.extractfile(m).read())  # type: ignore[union-attr]
        if m.isfile() and rx.search(path) and not (ex and ex.search(path)) and m.size <= max_bytes:
            f = tar.extractfile(m)
            if f is not None:
                yield path, f.read()


def raw_files(pin: Pin, raw: Path, found: dict[str, bytes] | None = None) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the files of ``pin`` matching its include/exclude regexes, in archive order (a Debian
    package's ``copyright`` file goes into ``found``)."""
    rx = re.compile(pin.include)
    ex = re.compile(pin.exclude) if pin.exclude else None
    max_bytes = int(pin.max_file_mb * 1e6)
    if pin.registry == "deb":
        deb = find_deb_file(raw, pin.name, pin.version)
        if not deb.is_file():
            raise S.SourceMissing(f"{deb.name} not in {deb.parent} (run `moe-data large --fetch-only`)")
        name, blob = _deb_data(deb)
        tar = _stream_tar(blob, name)
        if pin.reader == "tarball":
            inner_rx = re.compile(pin.inner)
            for m in tar:
                if m.isfile() and inner_rx.search(m.name):
                    inner = _stream_tar(tar.extractfile(m), m.name)  # type: ignore[arg-type]
                    yield from _tar_files(inner, rx, ex, max_bytes)
                    return
            raise S.SourceMissing(f"{deb.name}: no member matching {pin.inner!r}")
        yield from _tar_files(tar, rx, ex, max_bytes, found)
    elif pin.registry == "pypi":
        wheel = pin.archive(raw)
        if not wheel.is_file():
            raise S.SourceMissing(f"no wheel of {pin.name}=={pin.version} in {wheel.parent}")
        with zipfile.ZipFile(wheel) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                if rx.search(info.filename) and not (ex and ex.search(info.filename)) and info.file_size <= max_bytes:
                    yield info.filename, zf.read(info)
    elif pin.registry == "npm":
        tgz = pin.archive(raw)
        if not tgz.is_file():
            raise S.SourceMissing(f"{tgz.name} not in {tgz.parent}")
        with open(tgz, "rb") as f:
            yield from _tar_files(_stream_tar(f.read(), ".gz"), rx, ex, max_bytes)
    else:
        raise S.SourceMissing(f"{pin.name}: the files reader needs a deb, pypi or npm package")


def package_licence(pin: Pin, raw: Path, copyright: bytes | None = None) -> str:
    """The licence the package declares (Debian copyright, wheel METADATA, package.json), else the pin's.
    ``copyright``: a Debian package's copyright file when already read (saves a pass over the archive)."""
    if copyright is not None and pin.registry == "deb" and not pin.licence:
        m = re.search(r"^License: (.+)$", S.decode(copyright), re.M)
        return m.group(1).strip() if m else "see the package's copyright file"
    try:
        if pin.registry == "pypi":
            with zipfile.ZipFile(pin.archive(raw)) as zf:
                meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
                text = zf.read(meta).decode("utf-8", "replace").split("\n\n")[0] if meta else ""
            for pattern in (r"^License-Expression: (.+)$", r"^Classifier: License :: (?:OSI Approved :: )?(.+)$",
                            r"^License: (.{1,80})$"):
                m = re.search(pattern, text, re.M)
                if m and m.group(1).strip() not in ("UNKNOWN", ""):
                    return m.group(1).strip()
        elif pin.registry == "npm":
            with tarfile.open(pin.archive(raw), "r:gz") as tar:
                pkg = json.load(tar.extractfile("package/package.json"))  # type: ignore[arg-type]
            if isinstance(pkg.get("license"), str):
                return pkg["license"]
        elif pin.registry == "deb" and not pin.licence:
            deb = find_deb_file(raw, pin.name, pin.version)
            for path, data in _tar_files(_stream_tar(*reversed(_deb_data(deb))), re.compile(r"/copyright$"), None,
                                         1 << 24):
                m = re.search(r"^License: (.+)$", S.decode(data), re.M)
                if m:
                    return m.group(1).strip()
    except Exception:  # noqa: BLE001  (a missing field is not an error: fall back to the pin)
        pass
    return pin.licence or "see the package"


# ---------------------------------------------------------------- one package -> named texts


def package_texts(pin: Pin, raw: Path, seed: int = 0, found: dict[str, bytes] | None = None
                  ) -> Iterator[tuple[str, str]]:
    """(name, text) of every usable file of the package (for ``math``: one text per generated module)."""
    debs, work = raw / "debs", raw / "work"
    if pin.reader in ("files", "tarball"):
        budget = int(pin.max_mb * 1e6) if pin.max_mb else None
        used = 0
        for path, data in raw_files(pin, raw, found):
            path, text = to_text(path, data)
            if pin.name == "licensedcode-data" and text.startswith("---"):  # YAML front matter
                end = text.find("\n---", 3)
                text = text[end + 4:] if end >= 0 else text
            if not usable(text):
                continue
            yield path, text.strip("\n")
            used += len(text)
            if budget is not None and used >= budget:
                return
        return
    if pin.reader == "dictd":
        src = S.dictd(debs, pin.name, pin.dict, pin.licence)
    elif pin.reader == "sword":
        src = S.world_english_bible(debs, pin.name)
    elif pin.reader == "kjv":
        work.mkdir(parents=True, exist_ok=True)
        src = S.bible_kjv(debs, work)
    elif pin.reader == "austen":
        src = S.jane_austen(debs)
    elif pin.reader == "spdx":
        rx = re.compile(r"^package/licenses/[^/]+\.json$")
        for path, data in raw_files(Pin(**{**pin.__dict__, "include": rx.pattern}), raw):
            text = json.loads(S.decode(data)).get("licenseText") or ""
            if usable(text):
                yield path, text.strip("\n")
        return
    elif pin.reader == "math":
        work.mkdir(parents=True, exist_ok=True)
        src = S.start_dm_mathematics(work, pin.per_module, seed=seed)()
    else:
        raise ValueError(f"unknown reader {pin.reader!r}")
    for name, text in src.files:
        if usable(text):
            yield name, text
