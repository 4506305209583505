#!/bin/bash
# The device calls that measure the released pipeline on DM-large (MNIST eps 0.3), prepared. From the
# repository root, with MNIST's four files in .gpu/data/mnist (carry [".gpu"]), each call at once after
# the one before so that the machine stays warm and call 1's run folder (/tmp/rp, not carried) is kept:
#   1 (timeout_s 600): bash results/released_pipeline/gpu_calls.sh 1 2>&1 | tee $OUT/call1.log
#        AdvIBP --pipeline released, the preset's 250 epochs in bf16, then verify.py on the 10 000
#        test images (IBP, as the paper verifies; PGD-200)
#   2 (timeout_s 600): bash results/released_pipeline/gpu_calls.sh 2 2>&1 | tee $OUT/call2.log
#        the same with --weight-scope first (the authors' weights from conv1's gradient)
#   3 (what is left): bash results/released_pipeline/gpu_calls.sh 3 2>&1 | tee $OUT/call3.log
#        call 1's run extended by one layer-wise latent stage (--resume --latent-stages 1), as long as
#        the call allows (--latent-epochs 250; interrupted, it saves), then verified
# Every step has its own timeout; a training step that runs out is interrupted with SIGINT, so that it
# saves and what it saved is verified. Each call leaves at most 8 files in $OUT, its log included.
# TINY=1: a dry run on the CPU with tiny sizes (run it before a device call). DATA: elsewhere than .gpu/data.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DATA=${DATA:-.gpu/data}
START=$(date +%s)
took() { echo "[$1: exit $2 after $(( $(date +%s) - START )) s]"; }
if [ "$TINY" = 1 ]; then
    DEV=cpu; TRAIN_S=150; VERIFY_S=120; R=${RUNS:-/tmp/rp-tiny}
    SIZE="--model dm-small --epochs 4 --train-n 512 --test-n 200"; VSIZE="--n 200 --pgd-steps 10"
else
    DEV=cuda; TRAIN_S=500; VERIFY_S=70; R=${RUNS:-/tmp/rp}
    SIZE="--channels-last --clean-n 64"; VSIZE="--pgd-precision tf32"
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
train() {  # train.py, interrupted with SIGINT (it saves) when its time is up
    timeout -s INT -k 20 "$TRAIN_S" python train.py --dataset mnist --eps 0.3 --method advibp --pipeline released \
        --precision bf16 --device $DEV --data "$DATA" --no-download --eval-every 5 --save-every 50 $SIZE "$@" \
        > "$OUT/train.log" 2>&1
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
1)  train --out "$R/released" --overwrite; verify "$R/released" ;;
2)  train --out "$R/released-first" --overwrite --weight-scope first; verify "$R/released-first" ;;
3)  [ -f "$R/released/last.pt" ] || { echo "no $R/released/last.pt: call 1 ran on another machine"; exit 3; }
    train --out "$R/released" --resume --latent-stages 1 --latent-epochs 250; verify "$R/released" ;;
*)  echo "usage: gpu_calls.sh 1|2|3"; exit 2 ;;
esac
