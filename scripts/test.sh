#!/usr/bin/env bash
# The test command of the README: `bash scripts/test.sh [pytest args]`. On first use it sets up .venv
# (scripts/setup.sh venv: the tests build their own tiny corpora, so not the embedded one), then runs the default
# suite (GPU and slow tests are marked and run on the GPU machine: `bash scripts/test.sh -m gpu` / `-m slow`).
# Offline by construction: no W&B account, no hub.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh venv
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
