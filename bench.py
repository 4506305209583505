"""Benchmarks for certmin.

    python bench.py                 # per-step time and peak memory: clean, IBP, CROWN-IBP, AdvIBP steps
    python bench.py --batch 64 --model dm-large --steps 5
    python bench.py study --data DATA             # AdvIBP against its baselines and ablations, MNIST
    python bench.py verify runs/mnist-0.3-advibp --data DATA        # time and verified error per bound method
    python bench.py schedule runs/full/advibp runs/full/ibp   # finished runs + verify.json -> one table
    python bench.py train-step --device cuda --check           # train.py's step per variant, graphs check
    python bench.py preset --out OUT --data D -- --cuda-graphs # a preset trained and verified, one folder
    python bench.py gpu-run --out OUT --data D                 # both, inside a time budget (--tiny: CPU)
    python bench.py rounding MODELS/*.pth runs/M/last.pt   # float32 vs float64 bounds, and what sound_bounds keeps
    python bench.py recipe-cost                # the fast recipe's step (CNN-7) against the paper's (DM-large)
    python bench.py recipe-report OUT1 OUT3    # the fast recipe's device runs against their targets

Each kind of step runs in its own subprocess, so that its peak memory (max RSS on the CPU, the
allocator's peak on CUDA) is its own. Targets (DM-large, 3x32x32, batch 64, 2 CPU cores):
IBP <= 2.4x clean, CROWN-IBP <= 15x clean, AdvIBP <= 5x clean, CROWN-IBP peak memory <= 2.5 GiB.
"""
import argparse
import copy
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import certmin
import train
from train import strict_json

STEPS = ("clean", "ibp", "crown-ibp", "advibp")
TARGETS = {"ibp": 2.4, "crown-ibp": 15.0, "advibp": 5.0}
BUILDERS = train.MODELS


class ChildError(Exception):
    pass


def child_json(cmd):
    """Run a measuring child process; its last stdout line as JSON. A failed child's own error (its stderr's
    last lines) becomes a ChildError, which main() prints as one error: line."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise ChildError(tail.removeprefix("error: ") or f"{' '.join(cmd[1:3])} exited with status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
            x_adv = certmin.fgsm_rs(net, x, y, eps)  # as train.py: one backward for FOSC and L_adv's gradient
            loss_adv, fosc, _, grad_adv = certmin.adv_loss_and_fosc(net, x_adv, x, y, eps, params=tg.params)
            loss_ver, _ = certmin.verified_loss(net, x, y, eps)
            tg.step(loss_adv, loss_ver, fosc=fosc, c_t=0.0256, final=True, grad_adv=grad_adv)
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
    print(strict_json({"kind": kind, "seconds": statistics.median(times), "peak_gib": peak,
                      "all_seconds": [round(t, 3) for t in times]}))


# ---------------------------------------------------------------------------------------------
# The study: every method and ablation with the same budget and seed, then verify.py on each
# ---------------------------------------------------------------------------------------------

STUDY_ROWS = [("advibp", []), ("advibp-biased", ["--weights", "advibp-biased"]), ("mgda", ["--weights", "mgda"]),
              ("sum", ["--weights", "sum"]), ("ibp", ["--method", "ibp"]), ("crown-ibp", ["--method", "crown-ibp"]),
              ("pgd", ["--method", "pgd"]), ("natural", ["--method", "natural"])]
SEEDED = "advibp,ibp"  # rows repeated with every seed, for mean and spread
STUDY_COLUMNS = [("clean_err", "clean"), ("pgd_err", "PGD-200"), ("ibp_err", "IBP verified"),
                 ("crown_ibp_err", "CROWN-IBP verified"), ("best_err", "best verified")]


def _epoch_log(path):
    """One record per finished epoch of a train.py log.jsonl (a resumed run repeats none: the last wins)."""
    recs = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if isinstance(r["epoch"], int):
                recs[r["epoch"]] = r
    return [recs[e] for e in sorted(recs)]


def _mean_sd(values):
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def _study_table(summary, counts, args, seeds, seeded):
    def cell(name, key, scale, fmt):
        m = summary[name][key]
        return fmt.format(m["mean"] * scale) + (" ± " + fmt.format(m["sd"] * scale) if counts[name] > 1 else "")
    lines = [f"MNIST, test eps 0.3 (training eps 0.4), dm-small, {args.epochs} epochs of "
             f"{args.train_n or 60000} training images, batch 256; seeds {','.join(map(str, seeds))} for "
             f"{', '.join(seeded)} (mean ± sample standard deviation), seed {seeds[0]} for the other rows. "
             f"Errors in % on the first {args.n_test} test images, PGD-200 from verify.py.", "",
             "| row | seeds | " + " | ".join(title for _, title in STUDY_COLUMNS) + " | train wall | s / epoch |",
             "|---" * (len(STUDY_COLUMNS) + 4) + "|"]
    for name in summary:
        lines.append(f"| {name} | {counts[name]} | " + " | ".join(cell(name, key, 100, "{:.2f}") for key, _ in STUDY_COLUMNS)
                     + f" | {cell(name, 'train_seconds', 1 / 60, '{:.1f}')} min | {cell(name, 'seconds_per_epoch', 1, '{:.1f}')} |")
    return lines


def _study_plot(results, path):
    """Test IBP-verified error per epoch, one line per run; only where matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {name: f"C{i}" for i, (name, _) in enumerate(STUDY_ROWS)}
    for r in results:
        first = r["seed"] == min(q["seed"] for q in results if q["row"] == r["row"])
        ax.plot([c["epoch"] for c in r["curve"]], [100 * c["test_ibp_verified_err"] for c in r["curve"]],
                color=colors[r["row"]], lw=1.6 if first else 0.7, label=r["row"] if first else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("IBP-verified test error at eps 0.3 (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _study_run(i, runs, name, extra, seed, args, root):
    """One row's run of the study (trained and verified unless its verify.json exists): its figures."""
    run_dir = os.path.join(args.out, "study", f"{name}-seed{seed}")
    report = os.path.join(run_dir, "verify.json")
    if not os.path.exists(report):
        cmd = [sys.executable, os.path.join(root, "train.py"), "--dataset", "mnist", "--eps", "0.3",
               "--model", "dm-small", "--epochs", str(args.epochs), "--seed", str(seed), "--data", args.data,
               "--out", run_dir, "--eval-every", "1", "--test-n", str(args.n_test), "--train-n", str(args.train_n),
               *extra]
        if os.path.exists(os.path.join(run_dir, "last.pt")):
            cmd.append("--resume")
        print(f"== run {i + 1}/{len(runs)}: {name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
        t = time.time()
        subprocess.run(cmd, check=True)
        with open(os.path.join(run_dir, "train_seconds"), "a") as f:  # one line per (resumed) part
            f.write(f"{time.time() - t}\n")
        subprocess.run([sys.executable, os.path.join(root, "verify.py"), os.path.join(run_dir, "last.pt"),
                        "--data", args.data, "--n", str(args.n_test), "--json", report], check=True)
    with open(report) as f:
        r = json.load(f)["rows"][0]
    with open(os.path.join(run_dir, "train_seconds")) as f:
        wall = sum(float(line) for line in f)
    log = _epoch_log(os.path.join(run_dir, "log.jsonl"))
    return {"row": name, "seed": seed, "clean_err": r["clean_err"], "pgd_err": r["pgd_err"],
            "ibp_err": r["verified_err"]["ibp"], "crown_ibp_err": r["verified_err"]["crown-ibp"],
            "best_err": r["best_verified_err"], "certified_but_attacked": r["certified_but_attacked"],
            "train_seconds": wall, "seconds_per_epoch": sum(e["seconds"] for e in log) / len(log),
            "n_test": r["n"], "verify_seconds": r["seconds"],
            "curve": [{k: e[k] for k in ("epoch", "phase", "eps_ver", "test_clean_err", "test_ibp_verified_err",
                                         "seconds")} for e in log]}


def _study_parser():
    ap = argparse.ArgumentParser(prog="bench.py study", description="AdvIBP against its baselines and "
                                 "ablations on MNIST eps 0.3, dm-small, one epoch budget and seed for every row. Each run "
                                 "is train.py then verify.py in a subprocess; an interrupted study continues where it stopped.")
    ap.add_argument("--epochs", type=int, default=30, help="epoch budget of every run (default 30: about 2 h on 2 CPU cores)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds for the --seeded rows (the first for all rows)")
    ap.add_argument("--seeded", default=SEEDED, help=f"rows run with every seed (default {SEEDED})")
    ap.add_argument("--rows", default=",".join(name for name, _ in STUDY_ROWS),
                    help="comma-separated subset of the rows (default: all)")
    ap.add_argument("--n-test", type=int, default=1000, help="test images for PGD-200, the bounds and the curves")
    ap.add_argument("--train-n", type=int, default=0, help="training images (0: all 60000)")
    ap.add_argument("--data", default="data", help="MNIST folder (downloaded there if missing)")
    ap.add_argument("--out", default="results/study_cpu", help="writes OUT/study.json, OUT/study.md, OUT/study.png "
                    "(with matplotlib) and the runs in OUT/study/<row>-seed<seed>/")
    return ap


def study(argv):
    ap = _study_parser()
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = args.rows.split(",")
    seeded = args.seeded.split(",")
    unknown = sorted(set(rows + seeded) - {name for name, _ in STUDY_ROWS})
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {[name for name, _ in STUDY_ROWS]}")
    root = os.path.dirname(os.path.abspath(__file__))
    runs = [(name, extra, seed) for name, extra in STUDY_ROWS if name in rows
            for seed in (seeds if name in seeded else seeds[:1])]
    results = [_study_run(i, runs, name, extra, seed, args, root) for i, (name, extra, seed) in enumerate(runs)]
    summary, counts = {}, {}  # per row, in STUDY_ROWS order: mean and sd over its seeds
    for name, _ in STUDY_ROWS:
        rs = [r for r in results if r["row"] == name]
        if rs:
            counts[name] = len(rs)
            summary[name] = {key: dict(zip(("mean", "sd"), _mean_sd([r[key] for r in rs])))
                             for key in [k for k, _ in STUDY_COLUMNS] + ["train_seconds", "seconds_per_epoch"]}
    lines = _study_table(summary, counts, args, seeds, seeded)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "python": platform.python_version(), "cuda": torch.cuda.is_available()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "study.json"), "w") as f:
        f.write(strict_json({"epochs": args.epochs, "seeds": seeds, "seeded": seeded, "n_test": args.n_test, "train_n": args.train_n,
                   "eps": 0.3, "eps_train": 0.4, "model": "dm-small", "machine": machine, "summary": summary,
                   "runs": results}, indent=1))
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if _study_plot(results, os.path.join(args.out, "study.png")):
        lines.append(f"\nplot: {os.path.join(args.out, 'study.png')}")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The full schedule: finished train.py runs and their verify.py reports, in one JSON and table
# ---------------------------------------------------------------------------------------------

PAPER_MNIST_03 = {"advibp": {"clean": 1.90, "pgd": 2.87, "ibp": 6.60}, "ibp": {"ibp": 8.05}, "crown-ibp": {"ibp": 7.02}}


def _schedule_row(r):
    """One run's table row. The best test epoch is the authors' model selection (on the test set, here on
    the images of the per-epoch curve); certmin reports the last epoch, and labels the other."""
    pct = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
    cfg, row = r["config"], r["verify"]["rows"][0]
    ver = row["verified_err"]
    flags = [f"--weights {cfg['weights']}"] * (cfg["method"] in ("advibp", "advcrown-ibp") and cfg["weights"] != "advibp")
    flags += [f"--pipeline {cfg['pipeline']}"] * (cfg.get("pipeline", "paper") != "paper")
    flags += [f"--weight-scope {cfg['weight_scope']}"] * (cfg.get("weight_scope", "full") != "full")
    paper = {} if flags else PAPER_MNIST_03.get(r["method"], {})  # the paper gives no ablation at 250 epochs
    curve = [e for e in r["curve"] if e.get("test_ibp_verified_err") is not None]
    best = min(curve, key=lambda e: e["test_ibp_verified_err"], default=None)
    best_cell = f"{pct(best['test_ibp_verified_err'])} (epoch {best['epoch']})" if best else "–"
    return (f"| {' '.join([r['method'], *flags])} seed {r['seed']} | {r['epochs_done']}/{r['epochs']} | "
            f"{pct(row['clean_err'])} | {pct(row['pgd_err'])} | {pct(ver.get('ibp'))} | {pct(ver.get('crown-ibp'))} | "
            f"{pct(ver.get('crown'))} | {pct(row['best_verified_err'])} | {best_cell} | {paper.get('clean', '–')} / "
            f"{paper.get('pgd', '–')} / {paper.get('ibp', '–')} | {r['train_seconds'] / 60:.0f} min |")


def _schedule_report_parser():
    ap = argparse.ArgumentParser(prog="bench.py schedule", description="Collect finished train.py runs (RUN/log.jsonl "
                                 "with the per-epoch test curve, RUN/verify.json from verify.py, optionally "
                                 "RUN/verify_alpha.json) into one JSON and a markdown table beside the paper's figures.")
    ap.add_argument("runs", nargs="+", help="run folders")
    ap.add_argument("--out", default="results/full_schedule/report", help="writes OUT.json and OUT.md")
    return ap


def schedule_report(argv):
    ap = _schedule_report_parser()
    args = ap.parse_args(argv)
    runs, lines = [], []
    for run_dir in args.runs:
        for name in ("log.jsonl", "verify.json"):
            if not os.path.exists(os.path.join(run_dir, name)):
                ap.error(f"{run_dir} has no {name}: train with train.py --out {run_dir}, then run "
                         f"verify.py {run_dir}/last.pt --json {run_dir}/verify.json")
        log = _epoch_log(os.path.join(run_dir, "log.jsonl"))
        cfg = log[-1]["config"]
        with open(os.path.join(run_dir, "verify.json")) as f:
            report = json.load(f)
        extra = os.path.join(run_dir, "verify_alpha.json")
        alpha = json.load(open(extra)) if os.path.exists(extra) else None
        keys = ("epoch", "phase", "eps_adv", "eps_ver", "k_adv", "k_ver", "conflict", "loss_adv", "loss_ver",
                "clean_err", "adv_err", "ver_err", "test_clean_err", "test_ibp_verified_err", "seconds")
        runs.append({"run": run_dir, "method": cfg["method"], "weights": cfg["weights"], "model": cfg["model"],
                     "seed": cfg["seed"], "epochs": cfg["epochs"], "epochs_done": log[-1]["epoch"],
                     "train_seconds": sum(e["seconds"] for e in log), "config": cfg, "verify": report,
                     "verify_alpha": alpha, "curve": [{k: e.get(k) for k in keys} for e in log]})
    lines += ["| run | epochs | clean | PGD-200 | IBP verified | CROWN-IBP verified | CROWN verified | best verified "
              "| best test epoch (the authors' selection) | paper (DM-large): clean / PGD / verified | train time |",
              "|---|---|---|---|---|---|---|---|---|---|---|"] + [_schedule_row(r) for r in runs]
    n = runs[0]["verify"]["rows"][0]["n"]
    exact = [r for r in runs if r["verify"].get("exact_arithmetic")]  # verified since sound_bounds
    if not exact:
        how = "float32, certificates confirmed in float64"
    else:
        names = "" if len(exact) == len(runs) else " for " + ", ".join(r["run"] for r in exact)
        methods = exact[0]["verify"]["exact_arithmetic"]
        others = names or any(set(r["verify"]["methods"]) - set(methods) for r in exact)
        listed = " and ".join([", ".join(methods[:-1]), methods[-1]] if len(methods) > 1 else methods)
        how = (f"{listed} certificates in exact arithmetic{names} (certmin.sound_bounds)"
               + (", the others confirmed in float64" if others else ""))
    lines.append(f"\nErrors in % on {n} MNIST test images at eps {runs[0]['verify']['rows'][0]['eps']:.4f}, verify.py "
                 f"({how}); the paper's figures are DM-large's. The best test epoch is on the per-epoch curve's "
                 "test images (train.py --test-n), the authors' way of selecting a model; every other column is the "
                 "last epoch.")
    for r in runs:
        if r["verify_alpha"]:
            a = r["verify_alpha"]["rows"][0]
            lines.append(f"{r['method']}: on the first {a['n']} test images, " + ", ".join(
                f"{m} {100 * e:.2f}%" for m, e in a["verified_err"].items()) + " verified error.")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        f.write(strict_json({"machine": machine, "runs": runs}, indent=1))
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Verification cost: time per image and verified error per bound method
# ---------------------------------------------------------------------------------------------

VERIFY_METHODS = "ibp,crown-ibp,crown,alpha-crown"
# auto_LiRPA 0.7.1 full CROWN (method="CROWN"), measured on a 2-core x86_64 CPU (the
# table); the target is at most 2x. No peer library is installed or imported here.
PEERS = {"kw_mnist": (40, 1.29), "dm_small_x1": (1, 0.085), "dm_small_x4": (4, 0.57)}


def _status_gib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2 ** 20


def _reset_peak_rss():
    """Linux: reset the peak-RSS mark (data loading set it high), return the RSS now; elsewhere max RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_gib("VmRSS:")
    except OSError:
        return rss_gib()


def _peak_rss():
    try:
        return _status_gib("VmHWM:")
    except OSError:
        return rss_gib()


def _verify_one(args):
    """One method on one checkpoint in this process: a JSON line with seconds, errors and peak memory."""
    import verify
    ck = train.load_checkpoint(args.checkpoint)
    cfg = ck["config"]
    model = train.build_model(cfg)
    model.load_state_dict(ck["model"])
    model.eval().requires_grad_(False)
    x, y = train.load_data(cfg["dataset"], args.data, download=False, test_only=True)
    x, y = x[:args.n].float() / 255, y[:args.n]
    eps = cfg["eps"] if args.eps is None else args.eps
    base = _reset_peak_rss()
    verified, seconds = [], 0.0
    for i in range(-args.batch_size, args.n, args.batch_size):  # the first batch twice: warm-up, untimed
        xb, yb = x[max(i, 0):max(i, 0) + args.batch_size], y[max(i, 0):max(i, 0) + args.batch_size]
        C = certmin.margin_spec(yb, model[-1].out_features)
        t = time.perf_counter()
        ok = verify.certified_exactly(model, *certmin.input_box(xb, eps, outward=True), C, args.verify_one)
        if i >= 0:
            seconds += time.perf_counter() - t
            verified.append(ok)
    verified = torch.cat(verified)
    print(strict_json({"method": args.verify_one, "n": args.n, "eps": eps, "seconds_per_image": seconds / args.n,
                      "verified_err": 1 - verified.float().mean().item(), "peak_gib": _peak_rss() - base}))


def _peers_one(name, models, data):
    """Full CROWN on the peer configurations (PEERS); a JSON line with seconds per call."""
    n, _ = PEERS[name]
    if name == "kw_mnist":
        net = load_net(Path(models) / "kw_mnist.pth")[0]
        x, y = train.load_data("mnist", data, download=False, test_only=True)
        x, y, eps = x[:n].float() / 255, y[:n], 0.1
    else:
        torch.manual_seed(0)
        net = certmin.dm_small(3, 32)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(0.5)
        x, y, eps = torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,)), 1 / 255
    net.requires_grad_(False)
    C, box = certmin.margin_spec(y, 10), certmin.input_box(x, eps)
    times = []
    with torch.no_grad():
        for _ in range(4):  # the first call warms up (and may compile); median of the other three
            t = time.perf_counter()
            lb = certmin.bounds(net, *box, C, "crown")[0]
            times.append(time.perf_counter() - t)
    print(strict_json({"name": name, "seconds": statistics.median(times[1:]), "first_call": times[0],
                      "certified": int((lb > 0).all(1).sum())}))


def _verify_bench_parser():
    ap = argparse.ArgumentParser(prog="bench.py verify", description="Time per image and verified error of each "
                                 "bound method on a train.py checkpoint (each method in its own process, after one "
                                 "untimed warm-up batch; certificates in exact arithmetic, certmin.sound_bounds, as in verify.py). With "
                                 "--peers, full CROWN on three configurations against auto_LiRPA's measured times.")
    ap.add_argument("checkpoint", nargs="?", help="a .pt file written by train.py")
    ap.add_argument("--methods", default=VERIFY_METHODS)
    ap.add_argument("--n", type=int, default=200, help="first n test images")
    ap.add_argument("--eps", type=float, default=None, help="default: the checkpoint's test eps")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--data", default="data")
    ap.add_argument("--json", default=None)
    ap.add_argument("--peers", action="store_true", help="also run the peer comparison against auto_LiRPA's "
                    "measured times (needs --models and --data)")
    ap.add_argument("--models", default="models", help="with --peers: the folder holding kw_mnist.pth")
    ap.add_argument("--verify-one", help=argparse.SUPPRESS)
    ap.add_argument("--peers-one", help=argparse.SUPPRESS)
    return ap


def verify_bench(argv):
    ap = _verify_bench_parser()
    args = ap.parse_args(argv)
    if args.verify_one:
        return _verify_one(args)
    if args.peers_one:
        return _peers_one(args.peers_one, args.models, args.data)
    if not args.checkpoint and not args.peers:
        ap.error("give a checkpoint, --peers, or both")
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads", "rows": [], "peers": []}
    here = os.path.abspath(__file__)
    if args.checkpoint:
        for m in args.methods.split(","):
            cmd = [sys.executable, here, "verify", args.checkpoint, "--verify-one", m, "--n", str(args.n),
                   "--batch-size", str(args.batch_size), "--data", args.data] + (["--eps", str(args.eps)] if args.eps is not None else [])
            report["rows"].append(child_json(cmd))
            print(f"  measured {m}", file=sys.stderr, flush=True)
        r0 = report["rows"][0]
        print(f"{args.checkpoint}: first {r0['n']} test images, eps {r0['eps']:.4f}, batch {args.batch_size}; {report['machine']}\n")
        print("| method | time / image | verified error | peak memory |")
        print("|---|---|---|---|")
        for r in report["rows"]:
            print(f"| {r['method']} | {r['seconds_per_image']:.4f} s | {100 * r['verified_err']:.2f}% | "
                  f"{r['peak_gib']:.2f} GiB |")
        crown = [r for r in report["rows"] if r["method"] == "crown"]
        if crown:
            print(f"\ntarget (DM-small MNIST on a 2-core CPU): full CROWN well under 1 s per image: "
                  f"{crown[0]['seconds_per_image']:.3f} s {'met' if crown[0]['seconds_per_image'] < 1 else 'MISSED'}")
    if args.peers:
        print("\n| network | images | certmin CROWN | auto_LiRPA CROWN | ratio | target <= 2x |")
        print("|---|---|---|---|---|---|")
        for name, (n, peer) in PEERS.items():
            r = child_json([sys.executable, here, "verify", "--peers-one", name, "--models", args.models,
                            "--data", args.data])
            report["peers"].append({**r, "auto_lirpa_seconds": peer, "ratio": r["seconds"] / peer})
            print(f"| {name} | {n} | {r['seconds']:.3f} s (first call {r['first_call']:.2f} s) | {peer} s | "
                  f"{r['seconds'] / peer:.2f}x | {'met' if r['seconds'] <= 2 * peer else 'MISSED'} |")
    if args.json:
        with open(args.json, "w") as f:
            f.write(strict_json(report, indent=1))

# ---------------------------------------------------------------------------------------------
# The training step exactly as train.py takes it, one variant per subprocess, and the
# CUDA-graph check: graphs must give the eager step's weights
# ---------------------------------------------------------------------------------------------

STEP_VARIANTS = "fp32,tf32,bf16,tf32+graphs,bf16+graphs,tf32+graphs+cl,bf16+graphs+cl"
STEP_TARGET_MS = 8.0  # the joint-phase step, MNIST DM-large, batch 256, one H100
PHASES = ("natural", "adv-warmup", "joint", "joint-final")
IBP_PHASES = ("ibp", "ibp-final")  # --method ibp's


def phase_epoch(cfg, phase):
    """An epoch inside `phase` of cfg's AdvIBP schedule (mid-phase; for joint-final, once c_t is 0), or of
    --method ibp's (mid-ramp, and after it)."""
    (v0, v1), n = cfg["ver_ramp"], cfg["natural"]
    i0, i1 = cfg.get("ibp_ramp") or (n, v1)
    return {"natural": n / 2, "adv-warmup": (n + v0) / 2, "joint": (v0 + v1) / 2, "joint-final": cfg["c_decay"][1] + 1,
            "ibp": (i0 + i1) / 2, "ibp-final": i1 + 1}[phase]


def _step_setup(args, variant, seed=0, capture=None):
    """train.py's step for a variant PRECISION[+graphs][+cl] (cl: channels_last), on a random batch."""
    precision, *flags = variant.split("+")
    if precision not in train.PRECISIONS or not set(flags) <= {"graphs", "cl"}:
        raise SystemExit(f"bad variant {variant!r}: PRECISION[+graphs][+cl] with PRECISION one of {train.PRECISIONS}")
    graphs, cl = "graphs" in flags, "cl" in flags
    dev = torch.device(args.device)
    cfg = train.resolve(train.parse_args(
        ["--dataset", args.dataset, "--eps", args.eps, "--model", args.model, "--batch-size", str(args.batch),
         "--seed", str(seed), "--precision", precision, "--clean-n", str(getattr(args, "clean_n", 0)),
         "--recipe", getattr(args, "recipe", "paper"), "--method", getattr(args, "method", "advibp")]
        + ["--channels-last"] * cl))
    torch.manual_seed(seed)
    dist = train.Dist(dev)
    model, opt, tg = train.prepare_training(cfg, dev, dist, graphs)
    run_step, tally = train.build_step(model, opt, tg, cfg, dev, dist, graphs, capture=capture)
    c, side, _ = cfg["shape"]
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(args.batch, c, side, side, generator=g).to(dev)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(dev)
    return train, cfg, model, run_step, tally, x, y


def _sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def _step_one(args):
    """Time one variant's step in this process: steps per window, median of windows (a window ends
    with one synchronize, so the host's lead over the GPU counts as it does in training)."""
    train, cfg, model, run_step, tally, x, y = _step_setup(args, args.variant)
    s = train.schedule(cfg, phase_epoch(cfg, args.phase))
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        run_step(x, y, s)
    _sync(args.device)
    windows = []
    for _ in range(args.windows):
        t = time.perf_counter()
        for _ in range(args.steps):
            run_step(x, y, s)
        _sync(args.device)
        windows.append((time.perf_counter() - t) / args.steps)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.device(args.device).type == "cuda" else rss_gib()
    captured = getattr(run_step, "captured", [])
    if args.profile:  # where the time goes: the operators of 10 more steps, by their own device (or CPU) time
        cuda = torch.device(args.device).type == "cuda"
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(10):
                run_step(x, y, s)
            _sync(args.device)
        table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=30)
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        (Path(args.profile) / f"profile_{args.variant}.txt").write_text(
            f"{args.variant}, phase {args.phase}, batch {args.batch}, 10 steps\n{table}\n")
    print(strict_json({"variant": args.variant, "phase": args.phase, "ms": 1e3 * statistics.median(windows),
                      "windows_ms": [round(1e3 * w, 3) for w in windows], "peak_gib": peak, "captured": captured,
                      "loss_ver_mean": tally.means()["loss_ver"]}))


def _step_check(args):
    """The same 30 steps (12 in the verified-eps ramp, 18 at the final eps across c_t's decay and the
    learning-rate drop) eagerly twice and under CUDA graphs once, from the same seed and batch, in
    float32 with deterministic algorithms: how far apart the weights end (relative l2 over all
    parameters). The eager runs take the graphs' own path (schedule as tensors, capturable Adam) with
    capture off, so that capturing is the only difference; eager vs eager is the floor that any
    remaining nondeterminism sets. CUDA graphs replay the same random numbers (philox offsets), so
    the two should agree to that floor."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: deterministic
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)  # index_add_ has no deterministic CUDA kernel
    epochs = [60 + 0.05 * k for k in range(12)] + [140 + k for k in range(18)]
    finals, figures = {}, {}
    for name, capture in (("eager", False), ("eager_again", False), ("graphs", None)):
        train, cfg, model, run_step, tally, x, y = _step_setup(args, args.variant + "+graphs", capture=capture)
        if torch.device(args.device).type == "cuda":
            torch.cuda.manual_seed(0)
        for e in epochs:
            run_step(x, y, train.schedule(cfg, e))
        _sync(args.device)
        finals[name] = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        figures[name] = tally.means()
    rel = lambda a, b: float((a - b).norm() / a.norm())  # noqa: E731
    floor, graphs = rel(finals["eager"], finals["eager_again"]), rel(finals["eager"], finals["graphs"])
    out = {"variant": args.variant, "steps": len(epochs), "rel_diff_eager_vs_eager": floor,
           "rel_diff_graphs_vs_eager": graphs, "figures": figures,
           "pass": graphs <= max(10 * floor, 1e-6)}
    print(strict_json(out))


def _train_step_bench_parser():
    ap = argparse.ArgumentParser(prog="bench.py train-step", description="train.py's own step, timed per variant "
                                 "(precision[+graphs]) in its own process; --check compares CUDA graphs with eager")
    ap.add_argument("--dataset", default="mnist", choices=["mnist", "cifar"])
    ap.add_argument("--eps", default="0.3")
    ap.add_argument("--model", default="dm-large", choices=sorted(BUILDERS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--phase", default="joint", choices=PHASES + IBP_PHASES, help="ibp, ibp-final: with --method ibp")
    ap.add_argument("--recipe", default="paper", choices=sorted(train.RECIPES), help="train.py --recipe")
    ap.add_argument("--method", default="advibp", choices=("advibp", "ibp"), help="train.py --method")
    ap.add_argument("--variants", default=STEP_VARIANTS, help="comma-separated PRECISION[+graphs]; graphs need CUDA")
    ap.add_argument("--steps", type=int, default=50, help="steps per timing window")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (graphs are captured after 3)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check", action="store_true", help="also run the graphs-vs-eager check (fp32, deterministic)")
    ap.add_argument("--clean-n", type=int, default=0, help="train.py --clean-n")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per variant before it is given up")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also profile 10 steps of each variant (torch.profiler): DIR/profile_VARIANT.txt, by device time")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--check-one", default=None, help=argparse.SUPPRESS)
    return ap


def train_step_bench(argv):
    ap = _train_step_bench_parser()
    args = ap.parse_args(argv)
    if args.one:
        args.variant = args.one
        return _step_one(args)
    if args.check_one:
        args.variant = args.check_one
        return _step_check(args)
    common = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("dataset", "eps", "model", "batch", "phase", "steps",
                                                                       "windows", "warmup", "device", "clean_n", "recipe",
                                                                       "method")]
    common += [f"--profile={args.profile}"] if args.profile else []
    jobs = [("--one", v) for v in args.variants.split(",") if v] + ([("--check-one", "fp32")] if args.check else [])
    rows, check = [], None
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else platform.processor() or "cpu"

    def save():  # after every job: what a killed run measured is kept
        if args.json:
            with open(args.json, "w") as f:
                f.write(strict_json({"device": dev, "torch": torch.__version__, "model": args.model, "dataset": args.dataset,
                           "recipe": args.recipe, "method": args.method, "batch": args.batch, "phase": args.phase, "target_ms": STEP_TARGET_MS, "rows": rows,
                           "check": check}, indent=1))
    for flag, variant in jobs:
        cmd = [sys.executable, __file__, "train-step", *common, f"{flag}={variant}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None
            result = json.loads(line) if line else {"variant": variant, "error": done.stderr.strip()[-2000:]}
        except subprocess.TimeoutExpired:
            result = {"variant": variant, "error": f"gave up after {args.timeout:.0f} s"}
        if flag == "--check-one":
            check = result
        else:
            rows.append(result)
        print(f"  {flag[2:]} {variant}: " + (f"{result['ms']:.2f} ms" if "ms" in result else
                                              strict_json({k: v for k, v in result.items() if k != "figures"})[:3000]),
              file=sys.stderr, flush=True)
        save()
    print(f"\n{args.model}, {args.dataset}, batch {args.batch}, phase {args.phase}, {dev}, torch {torch.__version__}\n")
    print("| variant | ms / step | peak memory | graphs captured |")
    print("|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            mark = " (target met)" if r["ms"] <= STEP_TARGET_MS and args.phase == "joint" else ""
            print(f"| {r['variant']} | {r['ms']:.2f}{mark} | {r['peak_gib']:.2f} GiB | {', '.join(r['captured']) or '-'} |")
        else:
            print(f"| {r['variant']} | failed: {r['error'].splitlines()[-1] if r['error'] else '?'} | | |")
    if check:
        print(f"\nCUDA graphs vs eager ({check.get('steps')} steps): " + (
            f"relative l2 weight difference {check['rel_diff_graphs_vs_eager']:.2e}, eager vs eager "
            f"{check['rel_diff_eager_vs_eager']:.2e}: {'PASS' if check['pass'] else 'FAIL'}" if "pass" in check
            else f"failed: {check.get('error', '')[-500:]}"))
    return 0 if all("ms" in r for r in rows) and (check is None or check.get("pass")) else 1

# ---------------------------------------------------------------------------------------------
# The preset, trained and verified in one command: logs, JSON and a table in one folder
# ---------------------------------------------------------------------------------------------

PAPER = {("mnist", 0.3): {"clean_err": 1.90, "pgd_err": 2.87, "verified_err": 6.60}}  # Fan & Li 2021, DM-large, %


def _run_logged(cmd, log, timeout=None):
    """Run cmd, its output to the log file and to ours; after timeout seconds send it SIGINT (train.py
    then finishes its step, saves and stops). Returns (exit status, seconds)."""
    t = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        timer = threading.Timer(timeout, proc.send_signal, [signal.SIGINT]) if timeout else None
        if timer:
            timer.start()
        for line in proc.stdout:
            f.write(line)
            f.flush()
            sys.stdout.write(line)
            sys.stdout.flush()
        status = proc.wait()
        if timer:
            timer.cancel()
    return status, time.time() - t


def _preset_parser():
    ap = argparse.ArgumentParser(prog="bench.py preset", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Train a preset with train.py, certify it with verify.py, and write "
                                 "OUT/train.log, OUT/train_log.jsonl, OUT/verify.log, OUT/verify.json, OUT/preset.json "
                                 "and OUT/preset.md (the figures next to the paper's).",
                                 epilog="example: python bench.py preset --out results/preset -- --cuda-graphs\n"
                                        "arguments after -- go to train.py")
    ap.add_argument("--out", required=True, help="folder for the logs, JSON and table")
    ap.add_argument("--run-dir", default=None, help="train.py's --out (checkpoints; default OUT/run)")
    ap.add_argument("--dataset", default="mnist", choices=["mnist", "cifar"])
    ap.add_argument("--eps", default="0.3")
    ap.add_argument("--data", default="data")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-timeout", type=float, default=None,
                    help="seconds; then train.py is interrupted (it saves) and what it saved is verified")
    ap.add_argument("--verify-args", default="", help="extra verify.py arguments, e.g. '--n 1000 --pgd-steps 20'")
    ap.add_argument("train_args", nargs="*", help="after --: extra train.py arguments")
    return ap


def preset(argv):
    ap = _preset_parser()
    args = ap.parse_args(argv)
    import shlex
    import train as train_mod
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.run_dir) if args.run_dir else out / "run"
    here = Path(__file__).resolve().parent
    train_cmd = [sys.executable, str(here / "train.py"), "--dataset", args.dataset, "--eps", args.eps, "--out", str(run),
                 "--data", args.data, "--no-download", "--device", args.device, *args.train_args]
    verify_cmd = [sys.executable, str(here / "verify.py"), str(run / "last.pt"), "--data", args.data, "--no-download",
                  "--device", args.device, "--json", str(out / "verify.json"), *shlex.split(args.verify_args)]
    t0 = time.time()
    train_status, train_s = _run_logged(train_cmd, out / "train.log", args.train_timeout)
    if (run / "log.jsonl").exists():
        shutil.copy(run / "log.jsonl", out / "train_log.jsonl")
    verify_status, verify_s = _run_logged(verify_cmd, out / "verify.log") if (run / "last.pt").exists() else (None, 0.0)
    epochs = [json.loads(line) for line in open(run / "log.jsonl")] if (run / "log.jsonl").exists() else []
    report = {"train_command": shlex.join(train_cmd), "verify_command": shlex.join(verify_cmd),
              "train_status": train_status, "verify_status": verify_status, "train_seconds": train_s,
              "verify_seconds": verify_s, "total_seconds": time.time() - t0,
              "epochs_done": epochs[-1]["epoch"] if epochs else 0, "epochs": epochs[-1]["config"]["epochs"] if epochs else None,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else
              (platform.processor() or "cpu"), "torch": torch.__version__}
    paper = PAPER.get((args.dataset, train_mod.parse_eps(args.eps)))
    if (out / "verify.json").exists():
        row = json.load(open(out / "verify.json"))["rows"][0]
        report["measured"] = {"clean_err": 100 * row["clean_err"], "pgd_err": 100 * row["pgd_err"],
                              **{f"{m}_verified_err": 100 * v for m, v in row["verified_err"].items()},
                              "best_verified_err": 100 * row["best_verified_err"], "n": row["n"]}
        report["paper"] = paper
    with open(out / "preset.json", "w") as f:
        f.write(strict_json(report, indent=1))
    lines = [f"{args.dataset} eps {args.eps}: {report['epochs_done']} of {report['epochs']} epochs, "
             f"train {train_s:.0f} s + verify {verify_s:.0f} s = {report['total_seconds']:.0f} s on {report['device']}, "
             f"torch {report['torch']}", "", f"    {report['train_command']}", f"    {report['verify_command']}", ""]
    if "measured" in report:
        m = report["measured"]
        lines += ["| errors (%) | clean | PGD | IBP verified | CROWN-IBP verified | best verified |", "|---|---|---|---|---|---|"]
        cell = lambda key: f"{m[key]:.2f}" if key in m else "-"  # noqa: E731
        lines.append(f"| certmin ({m['n']} test images) | {cell('clean_err')} | {cell('pgd_err')} | "
                     f"{cell('ibp_verified_err')} | {cell('crown-ibp_verified_err')} | {cell('best_verified_err')} |")
        if paper:
            lines.append(f"| paper (Fan & Li 2021) | {paper['clean_err']:.2f} | {paper['pgd_err']:.2f} | "
                         f"{paper['verified_err']:.2f} | | |")
    (out / "preset.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if train_status == 0 and verify_status == 0 else 1


def _gpu_run_parser():
    ap = argparse.ArgumentParser(prog="bench.py gpu-run", description=gpu_run.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="data")
    ap.add_argument("--budget", type=float, default=570, help="seconds for everything")
    ap.add_argument("--precision", default="tf32", choices=train.PRECISIONS, help="for the preset run")
    ap.add_argument("--verify-seconds", type=float, default=75, help="kept back from training for verify.py")
    ap.add_argument("--verify-args", default="--methods ibp --pgd-precision tf32",
                    help="verify.py's arguments (default: IBP, as the paper verifies, and PGD-200 searched in TF32 "
                         "and judged in float32; with a float32 search and CROWN-IBP it took 55 s on an H100)")
    ap.add_argument("--skip-bench", action="store_true", help="no step benchmark: train with graphs and channels_last")
    ap.add_argument("--no-graphs", action="store_true", help="train without CUDA graphs (e.g. where a separate "
                    "`bench.py train-step --check` failed)")
    ap.add_argument("--tiny", action="store_true", help="CPU, DM-small, a few hundred images: a dry run")
    return ap


def gpu_run(argv):
    """In one command: the step benchmark with the graphs check, then the preset, trained
    with the measured-best flags and verified, inside a time budget. --tiny: the same on the CPU.
    --skip-bench: the preset alone, with CUDA graphs and channels_last (both measured faster on an
    H100 before), so that the whole budget goes to the 250 epochs; benchmark in a second call."""
    ap = _gpu_run_parser()
    args = ap.parse_args(argv)
    t0, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = args.precision
    if args.tiny:
        dev, variants = "cpu", f"{p},{p}+cl"
        step_args = ["--model", "dm-small", "--batch", "32", "--steps", "2", "--windows", "1", "--warmup", "4"]
        train_args = ["--model", "dm-small", "--epochs", "3", "--train-n", "640", "--batch-size", "64", "--test-n", "200"]
        verify_args = args.verify_args + " --n 200 --pgd-steps 10"
    else:
        dev, variants = "cuda", f"{p}+graphs,{p}+graphs+cl"
        step_args = ["--steps", "50", "--windows", "3", "--warmup", "10"]
        train_args, verify_args = ["--save-every", "50", "--eval-every", "25"], args.verify_args
    step_cmd = [sys.executable, __file__, "train-step", "--device", dev, "--phase", "joint", "--variants", variants,
                "--check", "--timeout", "90", "--clean-n", "64", "--json", str(out / "bench_step.json"), *step_args]
    if args.skip_bench:
        graphs, faster_cl = not args.tiny, True
    else:
        _run_logged(step_cmd, out / "bench_step.log", timeout=min(240, args.budget / 3))
        try:
            bench = json.loads((out / "bench_step.json").read_text())
        except (OSError, ValueError):
            bench = {"rows": [], "check": None}
        ms = {r["variant"]: r["ms"] for r in bench["rows"] if "ms" in r}
        graphs = bool((bench.get("check") or {}).get("pass")) and not args.tiny
        plain, cl = (f"{p}+graphs", f"{p}+graphs+cl") if not args.tiny else (p, f"{p}+cl")
        faster_cl = cl in ms and ms[cl] < ms.get(plain, math.inf)
    graphs = graphs and not args.no_graphs
    flags = ["--precision", p, "--clean-n", "64", "--cuda-graphs" if graphs else "--no-cuda-graphs"]
    if faster_cl:
        flags.append("--channels-last")
    left = args.budget - (time.time() - t0)
    print(f"preset with {' '.join(flags)}; {left:.0f} s left, training stops after {left - args.verify_seconds:.0f} s",
          flush=True)
    preset_argv = ["--out", str(out / "preset"), "--run-dir", str(out / "run") if args.tiny else "/tmp/certmin-run",
                   "--data", args.data, "--device", dev, "--train-timeout", str(max(10, left - args.verify_seconds)),
                   "--verify-args", verify_args, "--", *flags, *train_args]
    return preset(preset_argv)


# ---------------------------------------------------------------------------------------------
# Rounding: how far float32 bounds lie from float64 ones, and what certmin.sound_bounds (float64, every
# rounding bounded; what verify.py certifies with) keeps of float64's certificates and how far it widens.
# ---------------------------------------------------------------------------------------------

SHARED_NETS = {  # five small networks trained by others (kw_mnist.pth, ...): layer list and a default eps at which some certify
    "kw_mnist": (lambda: [torch.nn.Conv2d(1, 16, 4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 4, 2, 1),
                          torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(1568, 100), torch.nn.ReLU(),
                          torch.nn.Linear(100, 10)], "mnist", 0.1),
    "mnist_a_adv": (lambda: SHARED_NETS["kw_mnist"][0](), "mnist", 0.02),
    "mnist_cnn_small": (lambda: [torch.nn.Conv2d(1, 8, 4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 4, 2, 1),
                                 torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(),
                                 torch.nn.Linear(256, 10)], "mnist", 0.01),
    "mnist_fc_3layer": (lambda: [torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(),
                                 torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)], "mnist", 0.02),
    "cifar_2c2f": (lambda: [torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(3136, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)],
                   "cifar", 2 / 255),
}


def load_net(path):
    """(network in eval mode, dataset, eps) from a train.py checkpoint or one of SHARED_NETS' .pth files."""
    path = Path(path)
    if path.stem in SHARED_NETS:
        layers, dataset, eps = SHARED_NETS[path.stem]
        net = torch.nn.Sequential(*layers())
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(dict(zip(net.state_dict(), state.values())))  # their keys follow the layer order
        return net.eval(), dataset, eps
    ck = train.load_checkpoint(path)
    net = train.build_model(ck["config"])
    net.load_state_dict(ck["model"])
    return net.eval(), ck["config"]["dataset"], ck["config"]["eps"]


def _margin_boxes(net, x, y, eps, batch_size, outward=False):
    """(C, xl, xu) per batch: the margin specification and the eps-box of each example."""
    for i in range(0, len(y), batch_size):
        yield (certmin.margin_spec(y[i:i + batch_size], net[-1].out_features),
               *certmin.input_box(x[i:i + batch_size], eps, outward=outward))


def margin_scale(lb, ub):
    """An example's scale: 1 + the largest |bound| of its rows. Rounding is judged against it."""
    return 1 + torch.maximum(lb.abs(), ub.abs()).max(1).values


def rounding_errors(net, x, y, eps, method, batch_size=250):
    """float32 against float64 lower bounds of the margins on x's eps-boxes. Per example, the error is
    the largest |lb32 - lb64| over its rows, divided by its scale (margin_scale of the float32 bounds).
    Returns (relative errors (N,), certified in float32 (N,), also in float64 (N,))."""
    net64 = copy.deepcopy(net).double()
    rel, ok32, ok64 = [], [], []
    with torch.no_grad():
        for C, xl, xu in _margin_boxes(net, x, y, eps, batch_size):
            lb, ub = certmin.bounds(net, xl, xu, C, method)
            lb64, _ = certmin.bounds(net64, xl.double(), xu.double(), C.double(), method)
            scale = margin_scale(lb, ub).double()
            rel.append(((lb.double() - lb64).abs().max(1).values / scale).cpu())
            ok32.append((lb > 0).all(1).cpu())
            ok64.append((lb64 > 0).all(1).cpu())
    return torch.cat(rel), torch.cat(ok32), torch.cat(ok64)


def sound_bounds_widening(net, x, y, eps, method, batch_size=250):
    """certmin.sound_bounds against float64 bounds on x's eps-boxes (rounded outward, as verify.py builds them):
    per example, the largest lb64 - lb_sound over its rows divided by margin_scale, and whether
    sound_bounds certifies it. Returns (widening (N,), certified (N,))."""
    net64 = copy.deepcopy(net).double()
    wide, ok = [], []
    with torch.no_grad():
        for C, xl, xu in _margin_boxes(net, x, y, eps, batch_size, outward=True):
            lb, _ = certmin.sound_bounds(net, xl, xu, C, method)
            lb64, ub64 = certmin.bounds(net64, xl.double(), xu.double(), C.double(), method)
            wide.append(((lb64 - lb).max(1).values / margin_scale(lb64, ub64)).cpu())
            ok.append((lb > 0).all(1).cpu())
    return torch.cat(wide), torch.cat(ok)


def _rounding_parser():
    ap = argparse.ArgumentParser(prog="bench.py rounding", description="How far float32 bounds lie from float64 "
                                 "ones, relative to each example's scale (1 + its largest |bound|), and what "
                                 "certmin.sound_bounds (exact-arithmetic bounds, which verify.py certifies with) "
                                 "certifies and by how much it widens the float64 bounds.")
    ap.add_argument("nets", nargs="+", help="train.py checkpoints and/or the .pth files of SHARED_NETS")
    ap.add_argument("--data", default="data", help="folder with the datasets (the test split is read)")
    ap.add_argument("--n", type=int, default=1000, help="first n test images (IBP, CROWN-IBP)")
    ap.add_argument("--crown-n", type=int, default=100, help="first n test images for full CROWN")
    ap.add_argument("--methods", default="ibp,crown-ibp,crown")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    return ap


def rounding(argv):
    ap = _rounding_parser()
    args = ap.parse_args(argv)
    bad = set(args.methods.split(",")) - set(certmin.METHODS)
    if bad:
        ap.error(f"unknown method(s) {', '.join(sorted(bad))}; choose from {', '.join(certmin.METHODS)}")
    dev = torch.device(args.device)
    try:  # a bad file fails here, before any output
        nets = [(path, *load_net(path)) for path in args.nets]
        data = {dataset: train.load_data(dataset, args.data, download=False, test_only=True) for _, _, dataset, _ in nets}
    except train.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = []
    print(f"float32 vs float64 lower bounds; {platform.machine()}, torch {torch.__version__}, {dev}\n")
    print("| network | eps | method | images | max error / scale | median "
          "| certified float32 | refuted in float64 | certified by sound_bounds | its widening / scale |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path, net, dataset, eps in nets:
        x, y = data[dataset]
        for m in args.methods.split(","):
            n = args.crown_n if m in ("crown", "alpha-crown") else args.n
            t = time.time()
            rel, ok32, ok64 = rounding_errors(net.to(dev), (x[:n].float() / 255).to(dev), y[:n].to(dev), eps, m)
            r = {"net": str(path), "eps": eps, "method": m, "n": n, "max_rel": rel.max().item(),
                 "median_rel": rel.median().item(),
                 "certified32": int(ok32.sum()), "refuted64": int((ok32 & ~ok64).sum()), "seconds": time.time() - t}
            t = time.time()  # verify.py certifies with sound_bounds: what it keeps, what it costs
            wide, ok = sound_bounds_widening(net.to(dev), (x[:n].float() / 255).to(dev), y[:n].to(dev), eps, m)
            r.update(certified_sound=int(ok.sum()), sound_max_widening=wide.max().item(), sound_seconds=time.time() - t)
            rows.append(r)
            print(f"| {Path(path).stem if Path(path).stem in SHARED_NETS else path} | {eps:.4f} | {m} | {n} | "
                  f"{r['max_rel']:.1e} | {r['median_rel']:.1e} | {r['certified32']} | {r['refuted64']} | "
                  f"{r['certified_sound']} | {r['sound_max_widening']:.1e} |", flush=True)
    if args.json:
        Path(args.json).write_text(strict_json({"device": str(dev), "torch": torch.__version__,
                                               "rows": rows}, indent=1))


# ---------------------------------------------------------------------------------------------
# The fast recipe's step against the paper's, per method: BatchNorm and the regularisers should be cheap
# ---------------------------------------------------------------------------------------------

RECIPE_COST_TARGET = 1.3  # the fast recipe's step (CNN-7) / the paper's (DM-large), same method, batch and phase


def recipe_cost(argv):
    """train.py's step with --recipe fast (CNN-7: BatchNorm, regularisers while eps ramps, clipping) against
    --recipe paper (DM-large), for --method ibp and advibp, on the CIFAR shape, mid-ramp (where the
    regularisers run), each in its own process."""
    ap = argparse.ArgumentParser(prog="bench.py recipe-cost", description=recipe_cost.__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variant", default="fp32", help="PRECISION[+graphs][+cl], as for train-step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for method, phase in (("ibp", "ibp"), ("advibp", "joint")):
        ms = {}
        for recipe, model in (("paper", "dm-large"), ("fast", "cnn7")):
            cmd = [sys.executable, __file__, "train-step", "--dataset=cifar", "--eps=8/255", f"--model={model}",
                   f"--batch={args.batch}", f"--phase={phase}", f"--steps={args.steps}", f"--windows={args.windows}",
                   f"--warmup={args.warmup}", f"--device={args.device}", f"--recipe={recipe}", f"--method={method}",
                   f"--one={args.variant}"]
            ms[recipe] = child_json(cmd)["ms"]
        rows.append({"method": method, "phase": phase, "paper_ms": ms["paper"], "fast_ms": ms["fast"],
                     "ratio": ms["fast"] / ms["paper"]})
        print(f"  measured {method}", file=sys.stderr, flush=True)
    print(f"\nCIFAR shape, batch {args.batch}, {args.variant}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| method (phase) | paper: DM-large | fast: CNN-7 | ratio | target |")
    print("|---|---|---|---|---|")
    for r in rows:
        met = "met" if r["ratio"] <= RECIPE_COST_TARGET else "MISSED"
        print(f"| {r['method']} ({r['phase']}) | {r['paper_ms']:.1f} ms | {r['fast_ms']:.1f} ms | {r['ratio']:.2f}x | "
              f"<= {RECIPE_COST_TARGET}x ({met}) |")
    if args.json:
        with open(args.json, "w") as f:
            f.write(strict_json({"device": args.device, "torch": torch.__version__, "batch": args.batch,
                                 "variant": args.variant, "target": RECIPE_COST_TARGET, "rows": rows}, indent=1))
    return 0


# The fast recipe's targets on one H100 / H200: IBP-verified error in % on the 10 000 test images and the
# minutes to train and certify (train.py + verify.py), for the better of --method ibp and advibp
RECIPE_TARGETS = {"cifar": {"verified_err": 66.57, "minutes": 10, "moonshot": 65.03},  # Fan & Li; Shi et al.
                  "mnist": {"verified_err": 6.60, "minutes": 5}}


def _call_seconds(d):
    """Wall seconds from the start of training to the end of verification, from a gpu_calls.sh call's log
    in d (its "[step: exit N after S s]" lines count from the call's start), or None without one."""
    marks = {}
    for log in d.glob("call*.log"):
        for step, t in re.findall(r"\[(\w+)[^\]]*: exit \d+ after (\d+) s\]", log.read_text()):
            marks[step] = int(t)
    if "verify" not in marks:
        return None
    return marks["verify"] - marks.get("unpack", 0)


def recipe_report(argv):
    """The fast recipe's device runs against their targets: each DIR holds what a call of
    results/fast_recipe/gpu_calls.sh brought back (verify.json, train_log.jsonl)."""
    ap = argparse.ArgumentParser(prog="bench.py recipe-report", description=recipe_report.__doc__)
    ap.add_argument("dirs", nargs="+")
    args = ap.parse_args(argv)
    print("| run | clean | PGD | IBP verified | target | train + verify | target | both met |")
    print("|---|---|---|---|---|---|---|---|")
    for d in map(Path, args.dirs):
        report = json.loads((d / "verify.json").read_text())
        cfg, r = report["config"], report["rows"][0]
        seconds = _call_seconds(d) or (sum(rec["seconds"] for rec in _epoch_log(d / "train_log.jsonl")) +
                                       sum(r["seconds"].values()))
        target = RECIPE_TARGETS[cfg["dataset"]]
        err, minutes = 100 * r["verified_err"]["ibp"], seconds / 60
        met = err <= target["verified_err"] and minutes <= target["minutes"] and r["n"] == 10000
        note = "" if r["n"] == 10000 else f" (on {r['n']} images only)"
        print(f"| {cfg['dataset']} {cfg['method']} {cfg['model']} {cfg['epochs']} epochs | {100 * r['clean_err']:.2f} | "
              f"{100 * r['pgd_err']:.2f} | {err:.2f} | <= {target['verified_err']} | {minutes:.1f} min | "
              f"<= {target['minutes']} min | {'yes' if met else 'no'}{note} |")
    return 0


SUBCOMMANDS = {"study": study, "verify": verify_bench, "schedule": schedule_report, "train-step": train_step_bench,
               "preset": preset, "gpu-run": gpu_run, "rounding": rounding, "recipe-cost": recipe_cost,
               "recipe-report": recipe_report}


def main():
    if sys.argv[1:2] and sys.argv[1] in SUBCOMMANDS:
        try:
            return SUBCOMMANDS[sys.argv[1]](sys.argv[2:])
        except (ChildError, train.DataError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
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
        rows[kind] = child_json(cmd)
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
    sys.exit(main())
