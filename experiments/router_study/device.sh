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
#
# Router study v2 (sweep_v2.py; the first 110M training tokens of the large corpus = its first 7 shards):
#   bash experiments/router_study/device.sh prep-v2          # HERE: xz archives of the 7 shards, validation, tokenizer
#                                                            # (LARGE=<corpus_large dir>); prints what to carry per call
#   bash experiments/router_study/device.sh setup-v2         # THERE: install the wheels, unpack the archives received
#   V2_ARGS="..." bash experiments/router_study/device.sh start-v2 [STAGE] [SECS]
#                                                            # THERE: sweep_v2.py STAGE (all) detached, wait, collect
#   bash experiments/router_study/device.sh wait-v2 [SECS]   # THERE, again
# With OUT set, start-v2 and wait-v2 pack every finished run (everything but its checkpoints) into
# $OUT/router_study_v2/runs.tgz.part-* and the logs, tuning table and chosen settings into
# $OUT/router_study_v2/study.tgz; unpack them here from the repo root
# (`cat router_study_v2/runs.tgz.part-* | tar xz; tar xzf router_study_v2/study.tgz`) and run analyze_v2.py.
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

wait_for() {  # $1: the sweep script (sweep.py | sweep_v2.py), $2: its study root, $3: the wait command, $4: seconds at most
  local until=$((SECONDS + ${4:-540}))
  while [ $SECONDS -lt $until ] && pgrep -f "router_study/$1" >/dev/null; do sleep 10; done
  for log in "$2"/sweep*.log; do echo "== $log"; tail -n 25 "$log" || true; done
  pgrep -f "router_study/$1" >/dev/null && echo "SWEEP STILL RUNNING: run 'device.sh $3' again now" \
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

V2=data/router_study_v2_carry          # prep-v2's archives (git-ignored)
V2_ROOT=runs/router_study_v2
V2_ARGS=${V2_ARGS:---parallel 3 --gpus auto}
V2_SHARDS=7                            # the first 110M training tokens (data.max_train_tokens) lie in 7 shards

setup_v2() {
  if [ -d "$WHL" ] && [ ! -f /tmp/site/.moe_study_ready ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHL"/*.whl
    touch /tmp/site/.moe_study_ready
  fi
  mkdir -p data/corpus_large "$V2_ROOT"
  for a in "$V2"/*.tar.xz; do  # whatever archives this machine has received so far, each unpacked once
    [ -f "$a" ] || continue
    m="data/corpus_large/.unpacked-$(basename "$a" .tar.xz)"
    [ -f "$m" ] || { tar -xJf "$a" && touch "$m"; }
  done
  local have=0
  for i in $(seq 0 $((V2_SHARDS - 1))); do
    [ -f "data/corpus_large/.unpacked-train-$(printf %05d "$i")" ] && have=$((have + 1))
  done
  echo "large corpus: $have of $V2_SHARDS training shards unpacked$([ -f data/corpus_large/index.json ] || echo '; NO index.json yet (carry meta.tar.xz)')"
}

collect_v2() {
  [ -n "${OUT:-}" ] || return 0
  # at most 8 files of 16 MiB come back from a call: every finished run (all but its checkpoints) in one archive,
  # split into 15 MiB parts (join: cat runs.tgz.part-* | tar xz), and the study's logs and tables in another
  mkdir -p "$OUT/router_study_v2"
  local d runs=()
  for d in "$V2_ROOT"/*/ "$V2_ROOT"/tune/*/; do
    d=${d%/}
    [ -f "$d/report.json" ] && runs+=("$d")
  done
  rm -f "$OUT/router_study_v2"/runs.tgz.part-*
  ((${#runs[@]})) && tar czf - --exclude=checkpoints "${runs[@]}" | split -b 15M - "$OUT/router_study_v2/runs.tgz.part-"
  tar czf "$OUT/router_study_v2/study.tgz" --ignore-failed-read results/router_study_v2 "$V2_ROOT"/logs \
    "$V2_ROOT"/sweep*.log "$V2_ROOT"/distilled_hash/*.json 2>/dev/null || true
  echo "collected ${#runs[@]} finished runs"; du -ch "$OUT/router_study_v2" | tail -n 1
}

case "${1:-}" in
  prep-v2)
    src=${LARGE:-data/corpus_large}
    [ -f "$src/index.json" ] || { echo "no large corpus at $src: set LARGE=<its folder> (moe-data large builds one)"; exit 2; }
    [ -d "$WHL" ] || echo "NOTE: no $WHL yet: run 'device.sh prep' too (the wheels travel with the first call)"
    mkdir -p "$V2"
    tr=(--transform "s|^|data/corpus_large/|")
    # what every run needs first: the index, the validation split and the converted tokenizer
    tar -C "$src" -cJf "$V2/meta.tar.xz" "${tr[@]}" index.json manifest.json validation
    [ -d data/tokenizers ] && tar -cJf "$V2/tokenizers.tar.xz" data/tokenizers
    for i in $(seq 0 $((V2_SHARDS - 1))); do
      n=$(printf %05d "$i")
      [ -f "$V2/train-$n.tar.xz" ] || XZ_OPT=-6 tar -C "$src" -cJf "$V2/train-$n.tar.xz" "${tr[@]}" \
        "train/shard-$n.tokens" "train/shard-$n.docs.npy"
    done
    # device calls of at most 64 MiB of carried files: the wheels, meta and tokenizer first, then shards in order
    python3 - "$WHL" "$V2" <<'PY'
import os, sys
from pathlib import Path
whl, v2 = Path(sys.argv[1]), Path(sys.argv[2])
size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
items = [p for p in [whl, v2 / "meta.tar.xz", v2 / "tokenizers.tar.xz"] if p.exists()]
items += sorted(v2.glob("train-*.tar.xz"))
calls, cur, total = [], [], 0
for p in items:
    s = size(p)
    if cur and total + s > 64 * 2**20 - 2**20:  # 1 MiB left for the working tree
        calls.append(cur); cur, total = [], 0
    cur.append(str(p)); total += s
calls.append(cur)
for i, c in enumerate(calls, 1):
    mib = sum(size(Path(p)) for p in c) / 2**20
    print(f"call {i} ({mib:.1f} MiB): carry {c}")
PY
    ;;
  setup-v2)
    setup_v2
    PYTHONPATH="/tmp/site:$PWD" python3 -c 'import torch, hydra, lightning; print("GPUs:", torch.cuda.device_count())'
    ;;
  start-v2)
    setup_v2
    stage=${2:-all}
    secs=${3:-540}
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
    logger=()
    python3 -c 'import wandb' 2>/dev/null || { echo "WANDB DOES NOT IMPORT HERE: runs log with logger=csv"; logger=(logger=csv); }
    # detached (setsid): it outlives this command while the machine stays up; stops launching runs in time for
    # the ones running to end within this command (the runs resume with ckpt_path=last otherwise)
    # shellcheck disable=SC2086
    setsid nohup python3 experiments/router_study/sweep_v2.py "$stage" $V2_ARGS -- "${logger[@]}" \
      > "$V2_ROOT/sweep-$stage.log" 2>&1 < /dev/null &
    sleep 5
    if [ "$secs" != 0 ]; then wait_for sweep_v2.py "$V2_ROOT" wait-v2 "$secs"; fi
    collect_v2
    ;;
  wait-v2)
    wait_for sweep_v2.py "$V2_ROOT" wait-v2 "${2:-560}"
    collect_v2
    ;;
  collect-v2)
    collect_v2
    ;;
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
    if [ "${3:-540}" != 0 ]; then wait_for sweep.py "$ROOT" wait "${3:-540}"; fi
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
    wait_for sweep.py "$ROOT" wait "${2:-560}"
    collect
    ;;
  collect)
    collect
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
    ;;
esac
