"""sound_bounds in float32 arithmetic (dtype=torch.float32) against float64 (verify.py's): certificates
kept, widening over float64 bounds, time. Usage, from the repository root:
    python -m results.sound_bounds.float32_sound NET... [--n 1000] [--crown-n 100]"""
import argparse
import copy
import json
import time

import torch

import bench
import certmin
import train

ap = argparse.ArgumentParser()
ap.add_argument("nets", nargs="+")
ap.add_argument("--n", type=int, default=1000)
ap.add_argument("--crown-n", type=int, default=100)
ap.add_argument("--data", default="../shared/data")
ap.add_argument("--json", default=None)
args = ap.parse_args()
rows = []
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
print("| network | eps | method | images | certified, float64 sound | float32 sound | float32's widening / scale, max | time f64 / f32 |")
print("|---|---|---|---|---|---|---|---|")
for path in args.nets:
    net, dataset, eps = bench.load_net(path)
    x, y = train.load_data(dataset, args.data, download=False)[2:]
    net64 = copy.deepcopy(net).double()
    for method in ("ibp", "crown-ibp", "crown"):
        n = args.crown_n if method == "crown" else args.n
        ok, wide, t = {}, [], {}
        for dt in (torch.float64, torch.float32):
            t[dt], ok[dt] = 0.0, []
            for C, xl, xu in bench._margin_boxes(net, x[:n].float() / 255, y[:n], eps, 250, outward=True):
                s = time.time()
                lb, _ = certmin.sound_bounds(net, xl, xu, C, method, dtype=dt)
                t[dt] += time.time() - s
                ok[dt].append((lb > 0).all(1))
                if dt == torch.float32:
                    with torch.no_grad():
                        lb64, ub64 = certmin.bounds(net64, xl.double(), xu.double(), C.double(), method)
                    wide.append((lb64 - lb.double()).max(1).values / bench.margin_scale(lb64, ub64))
        c64, c32 = int(torch.cat(ok[torch.float64]).sum()), int(torch.cat(ok[torch.float32]).sum())
        w = float(torch.cat(wide).max())
        rows.append({"net": path, "eps": eps, "method": method, "n": n, "certified64": c64, "certified32": c32,
                     "max_widening32": w, "seconds64": t[torch.float64], "seconds32": t[torch.float32]})
        print(f"| {path.split('/')[-1]} | {eps:.4f} | {method} | {n} | {c64} | {c32} | {w:.1e} | "
              f"{t[torch.float64]:.1f} / {t[torch.float32]:.1f} s |", flush=True)
if args.json:
    json.dump({"torch": torch.__version__, "rows": rows}, open(args.json, "w"), indent=1)
