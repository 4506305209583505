#!/bin/bash
# Issue 11's device calls, prepared (README, "CUDA"). From the repository root, MNIST's four files in
# .gpu/data/mnist and ../shared/models' four MNIST networks in .gpu/models (carry [".gpu"]); each call
# at once after the one before (a warm machine is given back after 30 s idle, and its compile cache
# with it):
#   1 (timeout_s 130): bash results/cuda_mnist_0.3/gpu_calls.sh 1 2>&1 | tee $OUT/call1.log
#        the 8 ms target, and a smoke test of the GPU path (CUDA graphs, torch.compile, bf16,
#        channels_last) before the long call: if its graphs check fails, add --no-graphs to call 2
#   2 (timeout_s 600): bash results/cuda_mnist_0.3/gpu_calls.sh 2 [--no-graphs] 2>&1 | tee $OUT/call2.log
#        the preset, 250 epochs, and verify.py on the 10 000 test images
#   3 (what is left, up to 130 s): bash results/cuda_mnist_0.3/gpu_calls.sh 3 2>&1 | tee $OUT/call3.log
#        float32 rounding and sound_bounds on CUDA's kernels (README, "Verification")
# Every step has its own `timeout -k 5`; each call leaves at most 8 files in $OUT, its log included.
# TINY=1: a dry run on the CPU with tiny sizes (test_certmin.py runs it). DATA, NETS: elsewhere than
# .gpu/data and .gpu/models/*.pth.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DATA=${DATA:-.gpu/data}; NETS=${NETS:-.gpu/models/*.pth}
START=$(date +%s)
took() { echo "[$1: exit $2 after $(( $(date +%s) - START )) s]"; }
if [ "$TINY" = 1 ]; then DEV=cpu; else DEV=cuda; fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
case "$1" in
1)  # train.py's joint step in bf16 with graphs and channels_last (the best measured, 9.32 ms at
    # 464e09c), the graphs-vs-eager check, and a profile of 10 steps
    if [ "$TINY" = 1 ]; then
        SIZE="--model dm-small --batch 32 --steps 2 --windows 1 --warmup 4"; V=bf16+cl
    else
        SIZE="--steps 50 --windows 3 --warmup 10"; V=bf16+graphs+cl
    fi
    timeout -k 5 120 python bench.py train-step --device $DEV --phase joint --variants $V $SIZE --check \
        --clean-n 64 --timeout 60 --json "$OUT/bench_step.json" --profile "$OUT/prof"
    took train-step $?
    for f in "$OUT"/prof/profile_*.txt; do [ -e "$f" ] && mv "$f" "$OUT/$(basename "$f" | tr + _)"; done
    rm -rf "$OUT/prof" ;;
2)  # the preset: preset/{train,verify}.log, train_log.jsonl, verify.json, preset.json, preset.md
    GRAPHS=""; [ "$2" = --no-graphs ] && GRAPHS="--no-graphs"
    if [ "$TINY" = 1 ]; then
        timeout -k 5 300 python bench.py gpu-run --out "$OUT" --data "$DATA" --budget 240 --precision bf16 \
            --skip-bench --tiny $GRAPHS
    else
        timeout -k 5 590 python bench.py gpu-run --out "$OUT" --data "$DATA" --budget 580 --precision bf16 \
            --skip-bench $GRAPHS
    fi
    took gpu-run $?
    rm -rf "$OUT/run" ;;  # the tiny run's checkpoints (on the GPU they go to /tmp)
3)  # the shared networks first (their CPU figures are in results/sound_bounds; full CROWN on CUDA runs
    # without cuDNN at a speed never measured: 20 images), then a DM-large trained for 5 scaled epochs
    [ "$TINY" = 1 ] && SMALL="--model dm-small --train-n 512" RN="--n 100" || SMALL="" RN=""
    timeout -k 5 40 python bench.py rounding $NETS --device $DEV --data "$DATA" --crown-n 20 \
        $RN --json "$OUT/rounding_shared.json" >> "$OUT/rounding.md"
    took "rounding, shared networks" $?
    R5=$(mktemp -d)
    timeout -k 5 45 python train.py --dataset mnist --eps 0.3 --epochs 5 --test-n 1000 --data "$DATA" \
        --no-download --device $DEV --out "$R5" $SMALL > /dev/null
    took "train 5 epochs" $?
    timeout -k 5 30 python bench.py rounding "$R5/last.pt" --methods ibp,crown-ibp --device $DEV --data "$DATA" \
        $RN --json "$OUT/rounding_dmlarge.json" >> "$OUT/rounding.md"
    took "rounding, DM-large" $?
    rm -rf "$R5" ;;
*)  echo "usage: bash $0 1|2 [--no-graphs]|3"; exit 2 ;;
esac
ls -la "$OUT"
