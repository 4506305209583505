"""The released pipeline's test curves beside the paper pipeline's AdvIBP and IBP training, same seeds.

    python -m results.released_pipeline.compare [--out results/released_pipeline/compare.md]

Reads this folder's train_log_s0.jsonl and train_log_s1.jsonl (copies of the runs' log.jsonl) and
results/full_schedule/seed0.json and seed1.json; prints a markdown table of the test clean and
IBP-verified error (first 1000 test images, as the runs logged them) at chosen epochs, and each run's
best test epoch (the authors' selection, on the test set: reported, never used).
"""
import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
EPOCHS = (50, 60, 70, 80, 90, 95, 100, 105, 110, 120, 140, 160, 180, 200, 225, 250)


def released(seed):
    rows = [json.loads(line) for line in open(HERE / f"train_log_s{seed}.jsonl")]
    return {r["epoch"]: r for r in rows}


def paper(seed, method):
    runs = json.load(open(HERE.parent / "full_schedule" / f"seed{seed}.json"))["runs"]
    run = next(r for r in runs if r["method"] == method and r["weights"] == "advibp")
    return {r["epoch"]: r for r in run["curve"]}


def cell(curve, e):
    r = curve.get(e)
    if r is None or r.get("test_ibp_verified_err") is None or math.isnan(r["test_ibp_verified_err"]):
        return "–"
    return f"{100 * r['test_clean_err']:.1f} / {100 * r['test_ibp_verified_err']:.1f}"


def best(curve):
    done = [r for r in curve.values() if r.get("test_ibp_verified_err") is not None]
    r = min(done, key=lambda r: (r["test_ibp_verified_err"], r["epoch"]))
    return f"{100 * r['test_ibp_verified_err']:.1f} (epoch {r['epoch']})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    cols = [(f"released s{s}", released(s)) for s in (0, 1)]
    cols += [(f"paper pipeline AdvIBP s{s}", paper(s, "advibp")) for s in (0, 1)]
    cols += [(f"IBP training s{s}", paper(s, "ibp")) for s in (0, 1)]
    ref = cols[0][1]
    lines = ["| epoch | released phase, ε_ver | " + " | ".join(c for c, _ in cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    for e in EPOCHS:
        if not any(e in c for _, c in cols[:2]):
            continue
        r = ref.get(e) or cols[1][1][e]
        lines.append(f"| {e} | {r['phase']}, {r['eps_ver']:.3f} | " + " | ".join(cell(c, e) for _, c in cols) + " |")
    lines.append("| best test epoch | | " + " | ".join(best(c) for _, c in cols) + " |")
    table = "\n".join(lines)
    print("Test clean / IBP-verified error in %, first 1000 MNIST test images, eps 0.3, DM-small.\n")
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
