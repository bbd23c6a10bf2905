#!/usr/bin/env bash
# The router study on a GPU machine without network access, in commands of at most 10 minutes each (the sweep runs
# detached; the machine must stay up between commands).
#
#   bash experiments/router_study/device.sh prep             # HERE, with network access, once: wheels + data to copy
#   bash experiments/router_study/device.sh setup            # THERE: install the wheels, unpack the data (idempotent)
#   SWEEP_ARGS="..." bash experiments/router_study/device.sh start [TAG] [SECS]
#                                                            # THERE: setup, start a sweep detached, wait SECS (0: return)
#   bash experiments/router_study/device.sh wait [SECS]      # THERE, again: wait for the sweeps, collect results
#   setsid nohup bash experiments/router_study/device.sh analyze-loop &   # THERE: analyse runs as they finish
#
# Several sweeps can run at once on disjoint arms and GPUs (e.g. one on GPU 1 while GPU 0 runs a benchmark):
#   SWEEP_ARGS="--arms topk,hash_distilled --gpu-ids 1 --parallel 3 --no-analyze" device.sh start g1 0
# With OUT set to a folder, `start` and `wait` end by packing what exists so far into $OUT/router_study.tgz
# (results/router_study, every run's report.json, logs, configs and offline W&B run, the distilled tables'
# provenance; no checkpoints), so that a lost machine loses no finished numbers. Unpack here with
# `tar xzf router_study.tgz` and regenerate the report with
# `python experiments/router_study/analyze.py --study router_study --report-only --run-plots`.
# SWEEP_ARGS default: --parallel 4 --gpus auto. Runs log to offline W&B (wandb is carried); if wandb does not
# import there, the runs fall back to logger=csv and say so.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=data/router_study_carry.tar.xz   # data/ is git-ignored: copy both to the GPU machine's checkout
WHL=data/router_study_whl
SWEEP_ARGS=${SWEEP_ARGS:---parallel 4 --gpus auto}
ROOT=runs/router_study

collect() {
  [ -n "${OUT:-}" ] || return 0
  local files=(results/router_study "$ROOT"/logs "$ROOT"/sweep*.log "$ROOT"/analyze-loop.log)
  files+=("$ROOT"/*/report.json "$ROOT"/*/report.md "$ROOT"/*/.hydra "$ROOT"/*/wandb)
  files+=("$ROOT"/distilled_hash/*.json)
  tar czf "$OUT/router_study.tgz" --ignore-failed-read "${files[@]}" 2>/dev/null || true
  ls -la "$OUT"
}

wait_for_sweeps() {  # $1: seconds at most
  local until=$((SECONDS + ${1:-540}))
  while [ $SECONDS -lt $until ] && pgrep -f "router_study/sweep.py" >/dev/null; do sleep 10; done
  for log in "$ROOT"/sweep*.log; do echo "== $log"; tail -n 25 "$log" || true; done
  pgrep -f "router_study/sweep.py" >/dev/null && echo "SWEEP STILL RUNNING: run 'device.sh wait' again now" \
    || echo "SWEEP FINISHED"
}

setup() {
  if [ ! -f /tmp/site/.moe_study_ready ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHL"/*.whl
    touch /tmp/site/.moe_study_ready
  fi
  [ -d data/corpus ] || tar -xJf "$CARRY"
  mkdir -p "$ROOT"
}

case "${1:-}" in
  prep)
    mkdir -p "$WHL"
    py=.venv/bin/python
    pin() { for p in "$@"; do echo "$p==$($py -m pip show "$p" | awk '/^Version:/{print $2}')"; done; }
    # what the GPU machine's Python lacked (it had torch, lightning, tokenizers): Hydra, OmegaConf, datasets, W&B
    # and their needs, at the versions installed here
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHL" \
      $(pin hydra-core omegaconf datasets dill multiprocess wandb cwevals opentelemetry-api opentelemetry-sdk \
        opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common opentelemetry-proto \
        opentelemetry-semantic-conventions googleapis-common-protos pydantic pydantic-core annotated-types \
        typing-inspection platformdirs typing-extensions click protobuf) importlib-metadata
    python3 -m pip wheel -q --no-deps -w "$WHL" "$(pin antlr4-python3-runtime)"  # sdist only
    # the corpus (with its tokenised cache), the converted tokenizer and the routing-vocabulary cache
    tar -cJf "$CARRY" data/corpus data/tokenizers data/cache/routing
    du -ch "$WHL" "$CARRY" | tail -n 3
    echo "carry: [\"$WHL\", \"$CARRY\"]"
    ;;
  setup)
    setup
    PYTHONPATH="/tmp/site:$PWD" python3 -c 'import torch, hydra, datasets, lightning, wandb; print("GPUs:", torch.cuda.device_count(), "wandb", wandb.__version__)'
    ;;
  start)
    setup
    tag=${2:-main}
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
    logger=()
    python3 -c 'import wandb' 2>/dev/null || { echo "WANDB DOES NOT IMPORT HERE: runs log with logger=csv"; logger=(logger=csv); }
    # detached (setsid): it outlives this command while the machine stays up
    # shellcheck disable=SC2086
    setsid nohup python3 experiments/router_study/sweep.py --study router_study $SWEEP_ARGS -- "${logger[@]}" \
      > "$ROOT/sweep-$tag.log" 2>&1 < /dev/null &
    sleep 5
    if [ "${3:-540}" != 0 ]; then wait_for_sweeps "${3:-540}"; fi
    collect
    ;;
  analyze-loop)  # THERE, detached (setsid): analyse runs as they finish (cached per run), so the end is quick
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    sleep 60
    while pgrep -f "router_study/sweep.py" >/dev/null; do
      python3 experiments/router_study/analyze.py --study router_study >> "$ROOT/analyze-loop.log" 2>&1 || true
      sleep 20
    done
    ;;
  wait)
    wait_for_sweeps "${2:-560}"
    collect
    ;;
  collect)
    collect
    ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
