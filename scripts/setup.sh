#!/usr/bin/env bash
# One-shot setup: Python venv + package (lead's part, above), then the embedded corpus (data part, below).
set -euo pipefail
cd "$(dirname "$0")/.."

# ----------------------------------------------------------------------------------------------------------------
# PYTHON: .venv with torch pinned to the CPU build on this kind of machine (an open range would pull a multi-GB
#   CUDA build; on a GPU machine set MOE_TORCH to the torch you want, e.g. MOE_TORCH="torch>=2.11"), then the
#   package, editable, with its test extras. pip (not uv/poetry) so a local wheel folder is honoured.
# ----------------------------------------------------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "${MOE_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"

# ================================================================================================================
# DATA: download the Debian packages the corpus reads, then build DATA_ROOT/corpus with `moe-data`.
#   Needs .venv with the package installed. Re-running is cheap: present .debs are kept, and `moe-data` is a
#   no-op when the corpus exists (MOE_DATA_FORCE=1 rebuilds). Without apt-get the Debian-based domains are
#   skipped with a warning and the others (github, freelaw, dm_mathematics) are still built.
# ================================================================================================================
DATA_DEBS=(texlive-science-doc texlive-latex-recommended-doc bible-kjv bible-kjv-text sword-text-web
           r-cran-janeaustenr dict-foldoc dict-gcide dict-wn python3.11-doc perl-doc)

setup_data() {
    local data_root="${MOE_DATA_ROOT:-$PWD/data}"
    local debs="$data_root/raw/debs"
    mkdir -p "$debs"
    if command -v apt-get >/dev/null 2>&1; then
        local missing=()
        for p in "${DATA_DEBS[@]}"; do
            compgen -G "$debs/${p}_*.deb" >/dev/null || missing+=("$p")
        done
        if ((${#missing[@]})); then
            echo "setup: downloading ${#missing[@]} Debian packages into $debs"
            local sudo=""
            [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
            $sudo apt-get update -qq || echo "setup: WARNING: apt-get update failed; trying the download anyway" >&2
            # as root apt-get prints "W: Download is performed unsandboxed as root": harmless.
            # A failure of the batch (one unknown package) falls back to per-package downloads.
            if ! (cd "$debs" && apt-get download "${missing[@]}"); then
                for p in "${missing[@]}"; do
                    (cd "$debs" && apt-get download "$p" >/dev/null 2>&1) ||
                        echo "setup: WARNING: could not download Debian package $p: its corpus source is skipped" >&2
                done
            fi
        fi
    else
        echo "setup: WARNING: apt-get not found: the Debian sources (${DATA_DEBS[*]}) are skipped;" \
             "put their .debs in $debs to include them" >&2
    fi
    local force=()
    [ "${MOE_DATA_FORCE:-0}" = "1" ] && force=(--force)
    MOE_DATA_ROOT="$data_root" .venv/bin/moe-data "${force[@]}"
}

setup_data
