#!/usr/bin/env bash
# DM-small, MNIST eps 0.3, the full 250-epoch schedule with --pipeline released, one seed per call,
# one thread, then verify.py on the 10 000 test images. Resumes if the run folder holds a run.
#   nohup bash results/released_pipeline/run_cpu.sh 0 > runs/released_s0.log 2>&1 &
set -euo pipefail
seed=${1:-0}
data=${DATA:-../shared/data}
out=runs/released/advibp-released-s$seed
export OMP_NUM_THREADS=1
resume=""
[ -f "$out/last.pt" ] && resume="--resume"
python train.py --dataset mnist --eps 0.3 --model dm-small --method advibp --pipeline released --seed "$seed" \
    --data "$data" --out "$out" --eval-every 1 --test-n 1000 --progress 600 $resume
python verify.py "$out/last.pt" --data "$data" --methods ibp,crown-ibp,crown --json "$out/verify.json"
