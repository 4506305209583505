#!/bin/bash
# Issue 11 on one GPU: the step benchmark (with the graphs-vs-eager check), then the MNIST eps 0.3
# preset trained and verified by bench.py preset. Everything it reports lands in $OUT.
# TINY=1: the same on the CPU with tiny sizes (a dry run of this script).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-575}            # seconds this script may take in all
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
if [ "$TINY" = 1 ]; then
  DEV=cpu; BENCH="--model dm-small --batch 32 --steps 3 --windows 2 --warmup 5 --variants tf32,tf32+graphs"
  TRAIN="--model dm-small --epochs 3 --train-n 640 --batch-size 64 --test-n 200"; VERIFY="--n 200 --pgd-steps 10"
else
  DEV=cuda; BENCH="--variants tf32,tf32+graphs,bf16+graphs --steps 50 --windows 3 --warmup 10"
  TRAIN="--save-every 50 --eval-every 25"; VERIFY=""
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout -k 5 170 python bench.py train-step --device $DEV --phase joint $BENCH --check --timeout 70 \
  --json "$OUT/bench_step.json" > "$OUT/bench_step.log" 2>&1
echo "bench exit $? after $(( $(date +%s) - START )) s"; cat "$OUT/bench_step.log"
GRAPHS=$(python - "$OUT/bench_step.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    ok = (d.get("check") or {}).get("pass") and any(r["variant"] == "tf32+graphs" and "ms" in r for r in d["rows"])
except Exception:
    ok = False
print("--cuda-graphs" if ok else "--no-cuda-graphs")
PY
)
[ "$TINY" = 1 ] && GRAPHS=--no-cuda-graphs   # no graphs on the CPU
TT=$(( $(left) - 90 ))           # training may take what is left but 90 s for verify.py
echo "training with $GRAPHS, interrupted after $TT s at most"
timeout -k 10 $(( $(left) - 5 )) python bench.py preset --out "$OUT/preset" --run-dir /tmp/certmin-run --data .gpu/data \
  --device $DEV --train-timeout $TT --verify-args "$VERIFY" -- $GRAPHS $TRAIN > "$OUT/preset.log" 2>&1
echo "preset exit $? after $(( $(date +%s) - START )) s"
grep -E "^ +[0-9]+ |test:|error|Error" "$OUT/preset/train.log" | tail -n 40
cat "$OUT/preset/verify.log" "$OUT/preset/preset.md" 2>/dev/null | tail -n 30
rm -f "$OUT/preset.log"          # the same lines are in preset/train.log and preset/verify.log
