#!/bin/bash
# Issue 11's two device calls, prepared (README, "CUDA"). From the repository root, MNIST's four files in
# .gpu/data/mnist and ../shared/models' four MNIST networks in .gpu/models (carry [".gpu"]):
#   call 1 (timeout_s 600):  bash results/cuda_mnist_0.3/gpu_calls.sh 1 2>&1 | tee $OUT/call1.log   the preset
#   call 2 (timeout_s 205):  bash results/cuda_mnist_0.3/gpu_calls.sh 2 2>&1 | tee $OUT/call2.log   the step bench, rounding
# Call 2 must follow call 1 at once (a warm machine is given back after 30 s idle). Every step has its own
# `timeout -k 5`; everything lands in $OUT, at most 8 files per call with the log. TINY=1: a dry run on the CPU with
# tiny sizes (test_certmin.py runs it). DATA, NETS: elsewhere than .gpu/data and .gpu/models/*.pth.
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
1)  # the 250 epochs and verify.py on the 10 000 test images: preset/{train,verify}.log, *.json, preset.md
    if [ "$TINY" = 1 ]; then
        timeout -k 5 300 python bench.py gpu-run --out "$OUT" --data "$DATA" --budget 240 --precision bf16 \
            --skip-bench --tiny
    else
        timeout -k 5 590 python bench.py gpu-run --out "$OUT" --data "$DATA" --budget 580 --precision bf16 \
            --skip-bench
    fi
    took gpu-run $?
    rm -rf "$OUT/run" ;;  # the tiny run's checkpoints (on the GPU they go to /tmp)
2)  # the 8 ms target: train.py's joint step in bf16 with graphs and channels_last (the best measured,
    # 9.32 ms at 464e09c), and the graphs-vs-eager check
    if [ "$TINY" = 1 ]; then
        SIZE="--model dm-small --batch 32 --steps 2 --windows 1 --warmup 4"; V=bf16+cl; TO=60
        SMALL="--model dm-small --train-n 512"; RN="--n 100"
    else
        SIZE="--steps 50 --windows 3 --warmup 10"; V=bf16+graphs+cl; TO=40; SMALL=""; RN=""
    fi
    timeout -k 5 90 python bench.py train-step --device $DEV --phase joint --variants $V $SIZE --check \
        --clean-n 64 --timeout $TO --json "$OUT/bench_step.json" --profile "$OUT/prof"
    took train-step $?
    for f in "$OUT"/prof/profile_*.txt; do [ -e "$f" ] && mv "$f" "$OUT/$(basename "$f" | tr + _)"; done
    rm -rf "$OUT/prof"
    # float32's rounding on this device's kernels, and what sound_bounds certifies here (full CROWN on
    # CUDA without cuDNN: speed never measured, hence 20 images and its own timeout)
    R5=$(mktemp -d)
    timeout -k 5 45 python train.py --dataset mnist --eps 0.3 --epochs 5 --test-n 1000 --data "$DATA" \
        --no-download --device $DEV --out "$R5" $SMALL > /dev/null
    took "train 5 epochs" $?
    timeout -k 5 30 python bench.py rounding "$R5/last.pt" --methods ibp,crown-ibp --device $DEV --data "$DATA" \
        $RN --json "$OUT/rounding_dmlarge.json" >> "$OUT/rounding.md"
    took "rounding, DM-large" $?
    timeout -k 5 30 python bench.py rounding $NETS --device $DEV --data "$DATA" --crown-n 20 \
        $RN --json "$OUT/rounding_shared.json" >> "$OUT/rounding.md"
    took "rounding, shared networks" $?
    rm -rf "$R5" ;;
*)  echo "usage: bash $0 1|2"; exit 2 ;;
esac
ls -la "$OUT"
