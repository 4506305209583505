"""Benchmarks for certmin.

    python bench.py                 # per-step time and peak memory: clean, IBP, CROWN-IBP, AdvIBP steps
    python bench.py --batch 64 --model dm-large --steps 5

Each kind of step runs in its own subprocess, so that its peak memory (max RSS on the CPU, the
allocator's peak on CUDA) is its own. Targets (issue 2, DM-large, 3x32x32, batch 64, 2 CPU cores):
IBP <= 2.4x clean, CROWN-IBP <= 15x clean, AdvIBP <= 5x clean, CROWN-IBP peak memory <= 2.5 GiB.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import certmin

STEPS = ("clean", "ibp", "crown-ibp", "advibp")
TARGETS = {"ibp": 2.4, "crown-ibp": 15.0, "advibp": 5.0}
BUILDERS = {"dm-small": certmin.dm_small, "dm-medium": certmin.dm_medium, "dm-large": certmin.dm_large}


def rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


def one(kind, args):
    """Time `args.steps` steps of one kind in this process; print a JSON line."""
    torch.manual_seed(0)
    dev = torch.device(args.device)
    net = BUILDERS[args.model](in_ch=3, side=32, mean=[0.4914, 0.4822, 0.4465], std=[0.2023, 0.1994, 0.2010]).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)
    tg = certmin.TwoGradient(net.parameters())
    x = torch.rand(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    eps = 8.8 / 255

    def step():
        opt.zero_grad(set_to_none=True)
        if kind == "clean":
            F.cross_entropy(net(x), y).backward()
        elif kind in ("ibp", "crown-ibp"):
            certmin.verified_loss(net, x, y, eps, beta=float(kind == "crown-ibp"))[0].backward()
        else:
            x_adv = certmin.fgsm_rs(net, x, y, eps)
            loss_adv, fosc, _ = certmin.adv_loss_and_fosc(net, x_adv, x, y, eps)
            loss_ver, _ = certmin.verified_loss(net, x, y, eps)
            tg.step(loss_adv, loss_ver, fosc=fosc, c_t=0.0256, final=True)
        opt.step()

    base = rss_gib()
    times = []
    for i in range(args.warmup + args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else rss_gib() - base
    print(json.dumps({"kind": kind, "seconds": statistics.median(times), "peak_gib": peak}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dm-large", choices=sorted(BUILDERS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per kind (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", choices=STEPS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.one, args)
    rows = {}
    for kind in STEPS:
        cmd = [sys.executable, __file__, "--one", kind] + [f"--{k}={v}" for k, v in
                                                           [("model", args.model), ("batch", args.batch), ("steps", args.steps),
                                                            ("warmup", args.warmup), ("device", args.device)]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[kind] = json.loads(out.strip().splitlines()[-1])
        print(f"  measured {kind}", file=sys.stderr, flush=True)
    clean = rows["clean"]["seconds"]
    print(f"{args.model}, 3x32x32, batch {args.batch}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| step | time / step | x clean | target | peak memory |")
    print("|---|---|---|---|---|")
    for kind in STEPS:
        r = rows[kind]
        target = f"<= {TARGETS[kind]}x" if kind in TARGETS else ""
        print(f"| {kind} | {r['seconds']:.3f} s | {r['seconds'] / clean:.2f}x | {target} | {r['peak_gib']:.2f} GiB |")


if __name__ == "__main__":
    main()
