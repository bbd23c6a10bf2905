"""The pinned source list of the large corpus (``large_sources.toml``) and where each package's file lies."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tomllib

DEFAULT_PINS = Path(__file__).with_name("large_sources.toml")
REGISTRIES = ("deb", "pypi", "npm", "generated")
READERS = ("files", "tarball", "dictd", "sword", "kjv", "austen", "spdx", "math")


@dataclass(frozen=True)
class Pin:
    """One pinned package and how to read text from it (see the header of ``large_sources.toml``)."""

    name: str
    version: str
    registry: str
    domain: str
    reader: str = "files"
    include: str = ""
    exclude: str = ""
    inner: str = ""
    dict: str = ""
    split: str = "train"
    max_mb: float = 0.0
    max_file_mb: float = 4.0
    group: bool = False
    licence: str = ""
    per_module: int = 0
    needs: tuple[str, ...] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        return f"{self.registry}:{self.name}=={self.version}"

    def archive(self, raw: Path) -> Path:
        """The downloaded file of this pin under ``raw`` (it may not exist yet)."""
        if self.registry == "deb":
            return raw / "debs" / deb_filename(self.name, self.version)
        if self.registry == "npm":
            return raw / "npm" / f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"
        if self.registry == "pypi":
            stem = self.name.replace("-", "_").lower()
            found = sorted(p for p in (raw / "pypi").glob("*.whl") if _wheel_matches(p.name, stem, self.version))
            return found[0] if found else raw / "pypi" / f"{stem}-{self.version}-MISSING.whl"
        return raw / "work"


def _wheel_matches(filename: str, stem: str, version: str) -> bool:
    parts = filename.split("-")
    return len(parts) >= 3 and parts[0].lower() == stem and parts[1] == version


def deb_filename(name: str, version: str, arch: str = "all") -> str:
    """apt-get download's file name: the epoch colon is written %3a."""
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def find_deb_file(raw: Path, name: str, version: str) -> Path:
    debs = raw / "debs"
    for arch in ("all", "amd64", "arm64"):
        p = debs / deb_filename(name, version, arch)
        if p.is_file():
            return p
    found = sorted(debs.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
    if found:
        return found[0]
    return debs / deb_filename(name, version)


def load_pins(path: str | Path | None = None) -> list[Pin]:
    path = Path(path) if path else DEFAULT_PINS
    data = tomllib.loads(path.read_text())
    pins = []
    for i, entry in enumerate(data.get("source", [])):
        entry = dict(entry)
        missing = [k for k in ("name", "version", "registry", "domain") if not entry.get(k)]
        if missing:
            raise ValueError(f"{path}: source #{i + 1} lacks {missing}")
        if entry["registry"] not in REGISTRIES:
            raise ValueError(f"{path}: {entry['name']}: registry {entry['registry']!r} not in {REGISTRIES}")
        if entry.get("reader", "files") not in READERS:
            raise ValueError(f"{path}: {entry['name']}: reader {entry['reader']!r} not in {READERS}")
        if entry.get("split", "train") not in ("train", "validation"):
            raise ValueError(f"{path}: {entry['name']}: split must be 'train' or 'validation'")
        if entry.get("reader", "files") in ("files", "tarball") and not entry.get("include"):
            raise ValueError(f"{path}: {entry['name']}: the files/tarball readers need an `include` regex")
        entry["needs"] = tuple(entry.get("needs", ()))
        unknown = set(entry) - set(Pin.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: {entry['name']}: unknown field(s) {sorted(unknown)}")
        pins.append(Pin(**entry))
    keys = [p.key for p in pins]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"{path}: packages listed twice: {dup}")
    return pins
