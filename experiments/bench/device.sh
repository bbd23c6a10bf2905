#!/usr/bin/env bash
# The speed measurements on one GPU machine without network access, each command well under 10 minutes. With OUT
# set to a folder, every command writes into $OUT/bench/ (copy into results/bench/ here), else into results/bench/.
#
#   bash experiments/bench/device.sh config A [VARIANT ...]  # throughput.py for one config (default: the variants
#                                                           # of the results table)
#   bash experiments/bench/device.sh micro A B C            # optimizer_step.py: AdamW forms, SwiGLU backward forms
#   bash experiments/bench/device.sh profile A B C          # profile_step.py: where the compiled step's time goes
#   bash experiments/bench/device.sh gpu-tests              # the tests marked gpu (parity, optimizer_impl, kernels)
#   bash experiments/bench/device.sh lightning [STEPS [NAME OVERRIDE ...]]  # moe-train at config A's shape
#                                                           # (bf16-mixed, compiled), NAME: a run with OVERRIDEs
#
# Each command first installs what the machine lacks (experiments/router_study/device.sh setup: hydra, omegaconf,
# wandb and the embedded corpus; the benchmark builds moe-train's optimizer): carry data/router_study_whl and
# data/router_study_carry.tar.xz (made by experiments/router_study/device.sh prep here).
#
# A config's variants: HF's best (grouped_mm + torch.compile, the baseline), ours with each router, and beside
# ours_topk the forms that say what each change bought (the optimizer step of the benchmark before, fused AdamW;
# the SwiGLU derivative left to autograd) and the bf16-mixed step that moe-train's GPU trainer runs, without and
# with its gradient clipping.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEST=${OUT:+$OUT/bench}  # with OUT set, straight into it (what a killed command wrote still comes back)
DEST=${DEST:-results/bench}
LOGS=${OUT:+$OUT/bench}  # a config's console output (its partial results if it is killed); results/ has its JSON
LOGS=${LOGS:-runs/bench}
mkdir -p "$DEST" "$LOGS"
VARIANTS=(hf_grouped_mm_compile ours_topk ours_topk_fused_adamw ours_topk_slice_swiglu ours_topk_bf16_mixed
          ours_topk_bf16_mixed_clip ours_hash ours_span)


case "${1:-}" in config|micro|profile|gpu-tests|lightning) bash experiments/router_study/device.sh setup >/dev/null ;; esac

case "${1:-}" in
  config)
    name=${2:?config name: A, B or C}
    shift 2
    variants=("$@")
    [ ${#variants[@]} -gt 0 ] || variants=("${VARIANTS[@]}")
    python3 experiments/bench/throughput.py --config "$name" --variants "${variants[@]}" --out "$DEST" 2>&1 \
      | grep -v -i "warn" | tee "$LOGS/throughput-$name.log"
    ;;
  micro)
    shift
    [ $# -gt 0 ] || set -- A B C
    python3 experiments/bench/optimizer_step.py --config "$@" 2>&1 | grep -v "^W[0-9]" \
      | tee "$DEST/optimizer-swiglu-microbench.txt"
    ;;
  profile)
    shift
    [ $# -gt 0 ] || set -- A B C
    python3 experiments/bench/profile_step.py --config "$@" 2>&1 | grep -v -i "warn" \
      | tee "$DEST/profile-compiled-step.txt"
    ;;
  gpu-tests)
    python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -n 30
    ;;
  lightning)
    steps=${2:-300}
    tag=${3:+-$3}  # a name for a run with extra overrides (the rest of the arguments)
    run=runs/bench/lightning_gpu_medium$tag
    rm -rf "$run"
    # config A's shape; one validation at the end over 4 batches per domain, so that the report's steady-state
    # tokens/s (median of the logged 50-step windows after the first) is most of the wall time
    python3 -m moe_variants.training.run model=gpu_medium trainer=gpu experts=grouped compile=true \
      data.seq_len=2048 data.batch_size=8 trainer.max_steps="$steps" trainer.log_every_n_steps=50 \
      trainer.val_check_interval="$steps" trainer.limit_val_batches=4 hydra.run.dir="$run" logger=csv "${@:4}" 2>&1 \
      | grep -v -i "warn" | tail -n 40
    mkdir -p "$DEST/lightning_gpu_medium$tag"
    cp "$run"/report.md "$run"/report.json "$DEST/lightning_gpu_medium$tag/"
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
