"""The two entry commands (scripts/train.sh, scripts/test.sh) and their shared setup step, checked without
installing anything: shell syntax, CI = the README's test command, and setup.sh's stamp and failure messages
(its functions, sourced into bash in a temporary folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup.sh"


def setup_fn(cwd: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` in bash with setup.sh's functions defined, in ``cwd``."""
    return subprocess.run(
        ["bash", "-c", f'source "{SETUP}"; {script}'], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "PYTHON": sys.executable, **env}, timeout=60,
    )


@pytest.mark.parametrize("script", ["scripts/setup.sh", "scripts/train.sh", "scripts/test.sh", ".ci/run"])
def test_shell_syntax(script: str) -> None:
    res = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_ci_runs_exactly_the_readme_test_command() -> None:
    quick = re.search(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M).group(1)
    commands = [line.split("#")[0].strip() for line in quick.splitlines() if line.strip()]
    assert commands == ["bash scripts/train.sh", "bash scripts/test.sh"]  # the README's first code block
    ci = [ln for ln in (REPO / ".ci/run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ci == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "bash scripts/test.sh"]


def test_stamp_follows_pyproject_torch_spec_and_checkout(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    stamp = lambda **env: setup_fn(tmp_path, "setup_stamp", **env).stdout.strip()  # noqa: E731
    first = stamp()
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert stamp() == first
    assert stamp(MOE_TORCH="torch>=2.11") != first
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["six"]\n')
    assert stamp() != first
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "pyproject.toml").write_text((tmp_path / "pyproject.toml").read_text())
    assert setup_fn(moved, "setup_stamp").stdout.strip() != stamp()  # an editable install points at the old path


def test_venv_is_current_only_with_its_stamp_and_a_working_python(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    check = 'want=$(setup_stamp); venv_current "$want" && echo current || echo install'
    assert setup_fn(tmp_path, check).stdout.strip() == "install"  # no .venv
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)
    assert setup_fn(tmp_path, check).stdout.strip() == "install"  # a .venv, no stamp (a killed install)
    setup_fn(tmp_path, 'setup_stamp > "$STAMP"')
    assert setup_fn(tmp_path, check).stdout.strip() == "current"
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "y"\n')
    assert setup_fn(tmp_path, check).stdout.strip() == "install"  # pyproject.toml changed
    setup_fn(tmp_path, 'setup_stamp > "$STAMP"')
    (tmp_path / ".venv" / "bin" / "python").unlink()
    (tmp_path / ".venv" / "bin" / "python").symlink_to(tmp_path / "gone")
    assert setup_fn(tmp_path, check).stdout.strip() == "install"  # stamped, but its python is broken


@pytest.mark.parametrize(
    ("log", "says"),
    [
        ("OSError: [Errno 28] No space left on device: '/x/.venv/lib'", "the disk is full"),
        ("WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError(...: "
         "Failed to establish a new connection: [Errno -3] Temporary failure in name resolution')'",
         "pip could not reach the package index"),
        ("The virtual environment was not created successfully because ensurepip is not available.",
         "cannot create a virtual environment"),
        ("ERROR: Could not find a version that satisfies the requirement torch==9.9 (from versions: 2.13.0)",
         "no release satisfies a requirement"),
        ("moe-data: error: no source could be read", "see the messages above"),
    ],
)
def test_failure_diagnosis(tmp_path: Path, log: str, says: str) -> None:
    (tmp_path / "log").write_text(log + "\n")
    assert says in setup_fn(tmp_path, "diagnose log").stdout.splitlines()[0]


def test_a_failing_step_ends_with_one_error_line_and_nonzero_status(tmp_path: Path) -> None:
    res = setup_fn(tmp_path, "run_step 'installing the Python packages (pip)' sh -c 'echo Network is unreachable; "
                   "exit 3'; echo not reached")
    assert res.returncode == 1
    assert "not reached" not in res.stdout
    assert res.stderr.strip().splitlines()[-1].startswith(
        "setup: ERROR: installing the Python packages (pip) failed: pip could not reach the package index")


def test_setup_downloads_the_debian_packages_the_corpus_reads(tmp_path: Path) -> None:
    from moe_variants.data.build import DEB_PACKAGES

    assert setup_fn(tmp_path, 'echo "${DATA_DEBS[@]}"').stdout.split() == list(DEB_PACKAGES)


def test_only_leftovers_of_finished_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])  # a pid whose process has ended
    dead.wait()
    for name in (f"corpus.tmp{dead.pid}", f"corpus.tmp{os.getpid()}", "corpus.tmpx", "corpus"):
        (tmp_path / name).mkdir()
    assert setup_fn(tmp_path, 'rm_stale "$PWD/corpus.tmp"').returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corpus", f"corpus.tmp{os.getpid()}", "corpus.tmpx"])
