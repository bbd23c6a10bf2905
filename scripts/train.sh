#!/usr/bin/env bash
# The main job: `bash scripts/train.sh [hydra overrides...]`. On first use it sets up .venv and the embedded corpus
# (scripts/setup.sh; later calls skip that in under a second), then runs `moe-train` with the overrides as given,
# from the repository root (runs land in runs/<experiment>/<name>/). moe-train ends by printing the run report,
# with where the report, the checkpoint and the W&B run are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moe-train "$@"
