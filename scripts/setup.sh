#!/usr/bin/env bash
# The setup step that scripts/train.sh and scripts/test.sh run first. Idempotent and resumable:
#   bash scripts/setup.sh          # .venv + the embedded corpus (what the main job needs)
#   bash scripts/setup.sh venv     # .venv only (what the tests need: they build their own tiny corpora)
# A second call takes well under a second: .venv is reinstalled only when its stamp (pyproject.toml, the torch
# spec, the Python version, the checkout's path) changes, and the corpus step is skipped once the corpus exists.
# An interrupted call is resumed by the next one: the stamp is written only after pip succeeded, a .venv without a
# working python/pip is recreated, .debs are moved into place only once downloaded, and moe-data builds the corpus
# in a temporary folder that it renames into place when complete (leftovers of killed runs are removed).
# A failure ends with one line "setup: ERROR: <what failed>: <what to do>" and a non-zero exit status; only the
# optional Debian sources (no apt-get, a package that cannot be downloaded) are a warning.
set -euo pipefail

# ----------------------------------------------------------------------------------------------------------------
# PYTHON: .venv with torch pinned to the CPU build on this kind of machine (an open range would pull a multi-GB
#   CUDA build; on a GPU machine set MOE_TORCH to the torch you want, e.g. MOE_TORCH="torch>=2.11"), then the
#   package, editable, with its test extras. pip (not uv/poetry) so a local wheel folder is honoured.
# ----------------------------------------------------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.moe-setup-stamp"
TORCH_SPEC="${MOE_TORCH:-torch==2.13.0}"
STAMP_FORMAT=1  # bump when the install commands below change in a way an existing .venv does not have

fail() {
    echo "setup: ERROR: $*" >&2
    exit 1
}

# The stamp of the .venv this checkout wants: sha256 over everything the install depends on.
setup_stamp() {
    command -v "$PYTHON" >/dev/null 2>&1 ||
        fail "$PYTHON not found: install Python >= 3.10 or set PYTHON=/path/to/python3"
    "$PYTHON" - "$STAMP_FORMAT" "$TORCH_SPEC" <<'EOF'
import hashlib, os, sys
h = hashlib.sha256("\n".join([*sys.argv[1:], sys.version, os.path.realpath(sys.executable), os.getcwd(), ""]).encode())
h.update(open("pyproject.toml", "rb").read())
print(h.hexdigest())
EOF
}

venv_python_ok() { "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; }

# True when .venv was installed for this stamp and its python still runs.
venv_current() { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$1" ] && venv_python_ok; }

# What pip (urllib3) prints when it cannot reach an index.
NET_ERRORS="NewConnectionError|NameResolutionError|Failed to resolve|Failed to establish a new connection|Name or"
NET_ERRORS+=" service not known|Temporary failure in name resolution|Network is unreachable|Connection refused"
NET_ERRORS+="|Read timed out|ConnectTimeout|ProxyError|Could not fetch URL"

# One line on why a step failed and what to do, from its output (and the free disk space).
diagnose() {
    local log=$1 free_mb
    free_mb=$(df -Pk . 2>/dev/null | awk 'NR == 2 { print int($4 / 1024) }')
    if grep -qiE "No space left on device|Errno 28|Disk quota exceeded" "$log" || [ "${free_mb:-1000}" -lt 100 ]; then
        echo "the disk is full (${free_mb:-?} MB free under $PWD; .venv takes ~1.8 GB with CPU torch, data/ ~0.3 GB):" \
             "free some space, then run the same command again"
    elif grep -qiE "$NET_ERRORS" "$log"; then
        echo "pip could not reach the package index (no network?): connect to PyPI, or point PIP_INDEX_URL /" \
             "PIP_FIND_LINKS at a local mirror, then run the same command again"
    elif grep -q "ensurepip" "$log"; then
        echo "$PYTHON cannot create a virtual environment: install its venv module (Debian/Ubuntu:" \
             "apt-get install python3-venv), then run the same command again"
    elif grep -q "requires a different Python" "$log"; then
        echo "this package needs Python >= 3.10: set PYTHON=/path/to/python3.1x (the .venv is recreated with it)"
    elif grep -qE "No matching distribution found|Could not find a version that satisfies" "$log"; then
        echo "no release satisfies a requirement (pip's message above; torch spec: $TORCH_SPEC, set by MOE_TORCH):" \
             "fix the spec, then run the same command again"
    else
        echo "see the messages above; fix the cause, then run the same command again (finished steps are kept)"
    fi
}

# run_step [--quiet] WHAT CMD...: run CMD with its output shown (with --quiet: shown only if it fails, last 40
# lines) and kept; on failure, one line saying what failed and what to do, then exit non-zero.
run_step() {
    local quiet=0 what log rc why
    [ "$1" = --quiet ] && quiet=1 && shift
    what=$1
    shift
    log=$(mktemp 2>/dev/null) || log=/dev/null
    set +e
    if ((quiet)); then
        "$@" >"$log" 2>&1
        rc=$?
        ((rc == 0)) || tail -n 40 "$log" >&2
    else
        "$@" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
    fi
    set -e
    ((rc == 0)) || why=$(diagnose "$log")
    [ "$log" = /dev/null ] || rm -f "$log"
    ((rc == 0)) || fail "$what failed: $why"
}

setup_venv() {
    local want
    want=$(setup_stamp)
    if venv_current "$want"; then
        echo "setup: $VENV is up to date"
        return
    fi
    local pyver
    pyver=$("$PYTHON" -c "import sys; print(sys.version)")
    if ! venv_python_ok || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1 ||
        [ "$("$VENV/bin/python" -c "import sys; print(sys.version)")" != "$pyver" ]; then
        [ -e "$VENV" ] && echo "setup: $VENV has no working python/pip of $PYTHON (${pyver%% *}): recreating it"
        rm -rf "$VENV"
        run_step --quiet "creating $VENV with $PYTHON" "$PYTHON" -m venv "$VENV"
    fi
    rm -f "$STAMP"
    echo "setup: installing $TORCH_SPEC and this package (editable, with test extras) into $VENV" \
         "(a few minutes into an empty .venv)"
    PIP_ROOT_USER_ACTION=ignore "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # --quiet: pip's warnings (an index folder without the package, the editable-install notice) only on failure
    run_step --quiet "installing the Python packages (pip)" env PIP_ROOT_USER_ACTION=ignore \
        "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" -e ".[dev]"
    echo "$want" >"$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"  # only now: a killed install is redone next time
    echo "setup: $VENV ready"
}

# ================================================================================================================
# DATA: download the Debian packages the corpus reads, then build DATA_ROOT/corpus with `moe-data`.
#   Needs .venv with the package installed. Skipped once the corpus exists (MOE_DATA_FORCE=1 rebuilds); before
#   that, present .debs are kept. Without apt-get the Debian-based domains are skipped with a warning and the
#   others (github, freelaw, dm_mathematics) are still built.
# ================================================================================================================
DATA_DEBS=(texlive-science-doc texlive-latex-recommended-doc bible-kjv bible-kjv-text sword-text-web
           r-cran-janeaustenr dict-foldoc dict-gcide dict-wn python3.11-doc perl-doc)

# Remove what killed runs left: PREFIX<pid> folders whose process is gone (a live one may be another checkout's,
# when checkouts share MOE_DATA_ROOT).
rm_stale() {
    local d pid
    for d in "$1"*; do
        pid=${d#"$1"}
        [[ $pid =~ ^[0-9]+$ ]] && ! kill -0 "$pid" 2>/dev/null && rm -rf "$d"
    done
    return 0
}

fetch_debs() {
    local debs=$1
    mkdir -p "$debs"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: WARNING: apt-get not found: the Debian sources (${DATA_DEBS[*]}) are skipped;" \
             "put their .debs in $debs to include them" >&2
        return
    fi
    local missing=()
    for p in "${DATA_DEBS[@]}"; do
        compgen -G "$debs/${p}_*.deb" >/dev/null || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    echo "setup: downloading ${#missing[@]} Debian packages into $debs"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
    $sudo apt-get update -qq || echo "setup: WARNING: apt-get update failed; trying the download anyway" >&2
    # Into a scratch folder first, so a killed download never leaves a truncated .deb that looks complete.
    rm_stale "$debs/.partial"
    local part="$debs/.partial$$"
    mkdir -p "$part"
    # as root apt-get prints "W: Download is performed unsandboxed as root": harmless.
    # A failure of the batch (one unknown package) falls back to per-package downloads.
    if ! (cd "$part" && apt-get download "${missing[@]}"); then
        for p in "${missing[@]}"; do
            (cd "$part" && apt-get download "$p" >/dev/null 2>&1) ||
                echo "setup: WARNING: could not download Debian package $p: its corpus source is skipped" >&2
        done
    fi
    if compgen -G "$part/*.deb" >/dev/null; then
        mv "$part"/*.deb "$debs"/ || fail "moving the downloaded .debs into $debs failed: $(diagnose /dev/null)"
    fi
    rm -rf "$part"
}

setup_data() {
    local data_root="${MOE_DATA_ROOT:-$PWD/data}"
    local corpus="$data_root/corpus"
    # moe-data's own "already built" test (build_corpus), made here so that a second call skips loading torch
    if [ "${MOE_DATA_FORCE:-0}" != 1 ] && [ -f "$corpus/dataset_dict.json" ] && [ -f "$corpus/manifest.json" ]; then
        echo "setup: corpus already at $corpus (MOE_DATA_FORCE=1 rebuilds it)"
        return
    fi
    fetch_debs "$data_root/raw/debs"
    rm_stale "$corpus.tmp"  # moe-data builds into corpus.tmp<pid>
    local force=()
    [ "${MOE_DATA_FORCE:-0}" = 1 ] && force=(--force)
    run_step "building the corpus (moe-data)" env MOE_DATA_ROOT="$data_root" "$VENV/bin/moe-data" "${force[@]}"
}

# One setup at a time per checkout (train.sh and test.sh started together on a fresh clone would both install).
take_lock() {
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>"$VENV.lock"
    if ! flock -n 9; then
        echo "setup: another setup of this checkout is running; waiting for it"
        flock 9
    fi
}

main() {
    cd "$(dirname "$0")/.."
    local what=${1:-all}
    case $what in
        all | venv) ;;
        *) fail "unknown step '$what': use 'bash scripts/setup.sh' (all) or 'bash scripts/setup.sh venv'" ;;
    esac
    take_lock
    setup_venv
    [ "$what" = venv ] || setup_data
}

# Sourced (tests/test_scripts.py), only the functions are defined.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
