#!/bin/bash
# The device calls that measure the fast recipe (train.py --recipe fast), prepared. Before them, here, once:
#   python results/fast_recipe/cifar_parts.py pack ../shared/data/cifar10/cifar-10-batches-py .gpu --parts 3
#   mkdir -p .gpu/mnist && cp ../shared/data/mnist/*.gz .gpu/mnist/        (.git/info/exclude names /.gpu/)
# Then from the repository root, each call at once after the one before (the machine stays warm, and what
# a call unpacked into .gpu/data, or trained into /tmp/fr, is kept for the next):
#   1 carry [".gpu/c1", ".gpu/mnist"], timeout_s 420: bash results/fast_recipe/gpu_calls.sh 1 2>&1 | tee $OUT/call1.log
#        CIFAR part 1 unpacked; MNIST eps 0.3, --method ibp, the recipe's 70 epochs, verified on 10 000 images
#   2 carry [".gpu/c2"], timeout_s 420: bash results/fast_recipe/gpu_calls.sh 2 2>&1 | tee $OUT/call2.log
#        CIFAR part 2; MNIST eps 0.3 with --method advibp (or `2 data`: the part alone, about a minute less)
#   3 carry [".gpu/c3"], timeout_s 600: bash results/fast_recipe/gpu_calls.sh 3 2>&1 | tee $OUT/call3.log
#        CIFAR part 3 (the data complete, every file's md5 checked); CIFAR 8/255 --method ibp, 160 epochs, verified
#   4 (timeout_s 600): CIFAR 8/255 --method advibp with the recipe, as far as the call allows (it saves), verified
#   5 (timeout_s 600): the paper's CIFAR preset scaled to one call (--epochs 320, every phase kept), verified
# 15 device minutes hold the start, calls 1 (or 2 data), 2 data and 3; calls 4 and 5 belong to a later session
# (which needs calls 1-3's data again first: `1 data`, `2 data`, `3 data`).
# Every step has its own timeout; training that runs out is interrupted with SIGINT, so that it saves and what
# it saved is verified. Each call leaves at most 8 files in $OUT, its log included.
# TINY=1: a dry run on the CPU with tiny sizes (run it before a device call; DATA=../shared/data for training).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
GPU=${GPU:-.gpu}
DATA=${DATA:-$GPU/data}
START=$(date +%s)
took() { echo "[$1: exit $2 after $(( $(date +%s) - START )) s]"; }
if [ "$TINY" = 1 ]; then
    DEV=cpu; TRAIN_S=150; VERIFY_S=150; R=${RUNS:-/tmp/fr-tiny}
    SIZE="--epochs 2 --train-n 256 --test-n 100 --batch-size 64 --precision fp32"
    MNIST_MODEL="--model dm-small-bn"; CIFAR_MODEL="--model dm-small-bn"; VSIZE="--n 100 --pgd-steps 5"
else
    DEV=cuda; VERIFY_S=100; R=${RUNS:-/tmp/fr}
    case "$1" in 1|2) TRAIN_S=${TRAIN_S:-240} ;; *) TRAIN_S=${TRAIN_S:-450} ;; esac  # MNIST, CIFAR
    SIZE="--precision bf16 --channels-last --clean-n 64 --test-n 1000"; MNIST_MODEL=""; CIFAR_MODEL=""
    VSIZE="--pgd-precision tf32"
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
part() {  # unpack CIFAR part $1 into the data folder (kept on the warm machine)
    timeout -k 5 120 python results/fast_recipe/cifar_parts.py unpack "$GPU/c$1" "$DATA/cifar10/cifar-10-batches-py"
    took "unpack c$1" $?
}
mnist() {
    mkdir -p "$DATA/mnist" && cp "$GPU"/mnist/*.gz "$DATA/mnist/" 2>/dev/null
    ls "$DATA/mnist"
}
train() {  # train.py with the recipe, interrupted with SIGINT (it saves) when its time is up
    timeout -s INT -k 20 "$TRAIN_S" python train.py --recipe fast --device $DEV --data "$DATA" --no-download \
        --eval-every 10 --save-every 10 $SIZE "$@" > "$OUT/train.log" 2>&1
    took train $?
}
verify() {
    timeout -k 5 "$VERIFY_S" python verify.py "$1" --methods ibp --device $DEV $VSIZE --json "$OUT/verify.json" \
        > "$OUT/verify.log" 2>&1
    took verify $?
    cp "$1/log.jsonl" "$OUT/train_log.jsonl"
    tail -n 4 "$OUT/train.log"; cat "$OUT/verify.log"
}
case "$1" in
1)  part 1; mnist; [ "$2" = data ] && exit 0
    train --dataset mnist --eps 0.3 --method ibp $MNIST_MODEL --out "$R/mnist-ibp" --overwrite; verify "$R/mnist-ibp" ;;
2)  part 2; [ "$2" = data ] && exit 0
    train --dataset mnist --eps 0.3 --method advibp $MNIST_MODEL --out "$R/mnist-advibp" --overwrite
    verify "$R/mnist-advibp" ;;
3)  part 3; [ "$2" = data ] && exit 0
    train --dataset cifar --eps 8/255 --method ibp $CIFAR_MODEL --out "$R/cifar-ibp" --overwrite; verify "$R/cifar-ibp" ;;
4)  train --dataset cifar --eps 8/255 --method advibp $CIFAR_MODEL --out "$R/cifar-advibp" --overwrite
    verify "$R/cifar-advibp" ;;
5)  timeout -s INT -k 20 "$TRAIN_S" python train.py --dataset cifar --eps 8/255 --epochs 320 --device $DEV --data "$DATA" \
        --no-download --eval-every 40 --save-every 40 $SIZE $CIFAR_MODEL --out "$R/cifar-paper-320" --overwrite \
        > "$OUT/train.log" 2>&1
    took train $?
    verify "$R/cifar-paper-320" ;;
*)  echo "usage: gpu_calls.sh 1|2|3 [data] | 4 | 5"; exit 2 ;;
esac
