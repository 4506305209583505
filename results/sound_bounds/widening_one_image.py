"""Sound CROWN against float64 CROWN on one test image: the worst margin bound of each and the widening
relative to bench.margin_scale, as bench.py rounding measures it. Run from the repository root:

    python -m results.sound_bounds.widening_one_image CHECKPOINT [EPS] [--data ../shared/data]
"""
import argparse
import copy
import time

import torch

import bench
import certmin
import train

ap = argparse.ArgumentParser()
ap.add_argument("checkpoint")
ap.add_argument("eps", nargs="?", type=float, default=1 / 255)
ap.add_argument("--data", default="../shared/data")
args = ap.parse_args()
torch.set_num_threads(1)
net, dataset, _ = bench.load_net(args.checkpoint)
x, y = train.load_data(dataset, args.data, download=False)[2:]
x, y = x[:1].float() / 255, y[:1]
C = certmin.margin_spec(y, 10)
xl, xu = certmin.input_box(x, args.eps, outward=True)
t = time.time()
with torch.no_grad():
    lb64, ub64 = certmin.bounds(copy.deepcopy(net).double(), xl.double(), xu.double(), C.double(), "crown")
print(f"float64 crown: worst margin bound {lb64.min().item():.7f} ({time.time() - t:.0f} s)", flush=True)
t = time.time()
slb, _ = certmin.sound_bounds(net, xl, xu, C, "crown")
wide = ((lb64 - slb).max(1).values / bench.margin_scale(lb64, ub64)).item()
print(f"sound crown:   worst margin bound {slb.min().item():.7f}, widening / scale {wide:.1e} ({time.time() - t:.0f} s)")
