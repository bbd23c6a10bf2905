#!/usr/bin/env bash
# The test command of the README: the default suite (GPU and slow tests are marked and run on the GPU machine:
# `.venv/bin/python -m pytest -m gpu` / `-m slow`). Offline by construction: no W&B account, no hub.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
