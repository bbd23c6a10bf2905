#!/usr/bin/env bash
# The router study on a GPU machine that cannot reach the network (the device machine), in calls of <= 10 min.
#
#   bash experiments/router_study/device.sh prep          # HERE, on the CPU machine, once: wheels + data to carry
#   bash experiments/router_study/device.sh start [SECS]  # THERE: install, unpack, start the sweep detached, wait
#   bash experiments/router_study/device.sh wait [SECS]   # THERE, next calls: wait for the sweep, collect results
#
# `start` and `wait` end by packing what exists so far into $OUT/router_study.tgz (results/router_study, every
# run's report.json, logs and configs, the distilled tables' provenance; no checkpoints), so that a lost machine
# loses no finished numbers. Unpack here with `tar xzf router_study.tgz` and regenerate the report with
# `python experiments/router_study/analyze.py --study router_study --report-only`.
# Extra sweep arguments: SWEEP_ARGS (default: --parallel 4 --gpus auto -- logger=csv).
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=data/router_study_carry.tar.xz   # data/ is git-ignored: both travel only when `carry` names them
WHL=data/router_study_whl
SWEEP_ARGS=${SWEEP_ARGS:---parallel 4 --gpus auto -- logger=csv}

collect() {
  [ -n "${OUT:-}" ] || return 0
  local files=(results/router_study runs/router_study/logs runs/router_study/sweep.log)
  files+=(runs/router_study/*/report.json runs/router_study/*/report.md runs/router_study/*/.hydra)
  files+=(runs/router_study/distilled_hash/*.json)
  tar czf "$OUT/router_study.tgz" --ignore-failed-read "${files[@]}" 2>/dev/null || true
  ls -la "$OUT"
}

wait_for_sweep() {  # $1: seconds at most
  local until=$((SECONDS + ${1:-540}))
  while [ $SECONDS -lt $until ] && pgrep -f "router_study/sweep.py" >/dev/null; do sleep 10; done
  tail -n 40 runs/router_study/sweep.log || true
  pgrep -f "router_study/sweep.py" >/dev/null && echo "SWEEP STILL RUNNING: call 'device.sh wait' again now" \
    || echo "SWEEP FINISHED"
}

case "${1:-}" in
  prep)
    mkdir -p "$WHL"
    py=.venv/bin/python
    ver() { $py -m pip show "$1" | awk '/^Version:/{print $2}'; }
    # what the device image lacks (KINDS.md lists its packages): Hydra, OmegaConf, ANTLR runtime, datasets
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHL" \
      "hydra-core==$(ver hydra-core)" "omegaconf==$(ver omegaconf)" "datasets==$(ver datasets)" \
      "dill==$(ver dill)" "multiprocess==$(ver multiprocess)"
    python3 -m pip wheel -q --no-deps -w "$WHL" "antlr4-python3-runtime==$(ver antlr4-python3-runtime)"  # sdist only
    # the corpus (with its tokenised cache), the converted tokenizer and the routing-vocabulary cache
    tar -cJf "$CARRY" data/corpus data/tokenizers data/cache/routing
    du -ch "$WHL"/* "$CARRY" | tail -n 12
    echo "carry: [\"$WHL\", \"$CARRY\"]"
    ;;
  start)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
    tar -xJf "$CARRY"
    mkdir -p runs/router_study
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    python3 -c 'import torch, hydra, datasets, lightning; print("GPUs:", torch.cuda.device_count())'
    # detached (setsid): it outlives this call while the machine stays held
    # shellcheck disable=SC2086
    setsid nohup python3 experiments/router_study/sweep.py --study router_study $SWEEP_ARGS \
      > runs/router_study/sweep.log 2>&1 < /dev/null &
    sleep 5
    wait_for_sweep "${2:-540}"
    collect
    ;;
  wait)
    wait_for_sweep "${2:-560}"
    collect
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
