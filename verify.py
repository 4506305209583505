"""verify.py: certify a model that train.py saved, on the test set: the numbers a paper reports.

    python verify.py runs/mnist-0.3-advibp/last.pt                     # clean, PGD-200, IBP and CROWN-IBP
    python verify.py runs/cifar-8_255-advibp/last.pt --methods ibp,crown-ibp,crown,alpha-crown --json out.json
    python verify.py last.pt --eps-sweep 0.1,0.2,0.3,0.4 --n 1000      # a certified-accuracy curve

Errors are fractions of the evaluated test images. An example counts as verified by "best" when any
method verifies it: each is a sound bound, so the best of them is sound too. Every certificate holds in
exact arithmetic: the bounds are certmin.sound_bounds, computed in float64 over a box rounded outward (so
that it contains the real eps-ball) and widened by a bound on every rounding. An example that a method
certifies but PGD misclassifies would be a soundness bug: it is counted, printed, and makes the exit
status non-zero.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

import certmin
from train import (PRECISIONS, DataError, build_model, load_checkpoint, load_data, parse_eps, set_precision,
                   strict_json)


def certified_exactly(model, xl, xu, C, method, progress=None, alpha_steps=None):
    """(N,) bool: the examples whose margins method bounds above zero in exact arithmetic (certmin.sound_bounds,
    float64)."""
    kw = {} if alpha_steps is None else {"alpha_steps": alpha_steps}
    lb, _ = certmin.sound_bounds(model, xl, xu, C, method, progress=progress, **kw)
    return (lb > 0).all(1)


@contextlib.contextmanager
def searching_in(precision, device):
    """The arithmetic PGD searches in (--pgd-precision): fp32, tf32 (TF32 convolutions and matmuls,
    CUDA only; float32 elsewhere) or bf16 (autocast), inside the certmin.ieee guard that main() holds
    for every other pass. Afterwards, the guard's IEEE float32 again."""
    was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        set_precision(precision)
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was


def certify(model, x, y, eps, methods, pgd_steps, pgd_step_size, restarts, batch_size, dtype, device,
            alpha_steps=None, pgd_precision="fp32"):
    """One row of the report for one eps. PGD searches in pgd_precision; every point it returns is
    judged in dtype, so the PGD column counts only misclassifications that hold there."""
    n = len(y)
    wrong = torch.zeros(n, dtype=torch.bool)
    attacked = torch.zeros(n, dtype=torch.bool)
    verified = {m: torch.zeros(n, dtype=torch.bool) for m in methods}
    seconds = {m: 0.0 for m in ("pgd", *methods)}
    t_start = time.time()
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        xb = (x[sl].to(device).to(dtype) / 255)
        yb = y[sl].to(device)
        with torch.no_grad():
            wrong[sl] = (model(xb).argmax(1) != yb).cpu()
        t = time.time()
        with searching_in(pgd_precision, device):
            x_adv = certmin.pgd(model, xb, yb, eps, steps=pgd_steps, step_size=pgd_step_size, restarts=restarts)
        with torch.no_grad():
            attacked[sl] = (model(x_adv).argmax(1) != yb).cpu() | wrong[sl]
        seconds["pgd"] += time.time() - t
        C = certmin.margin_spec(yb, model[-1].out_features).to(dtype)
        box = certmin.input_box(x[sl].to(device).double() / 255, eps, outward=True)  # the real image's ball
        for m in methods:
            t = last = time.time()

            def progress(done, total):  # full CROWN can take minutes per batch: say how far it is
                nonlocal last
                if time.time() - last > 10:
                    last = time.time()
                    print(f"  eps {eps:.4f}: images {i}-{min(i + batch_size, n)}, {m}: {done}/{total} "
                          f"hidden neurons bounded", file=sys.stderr, flush=True)
            verified[m][sl] = certified_exactly(model, *box, C, m, progress, alpha_steps).cpu()
            seconds[m] += time.time() - t
        done = min(i + batch_size, n)
        print(f"  eps {eps:.4f}: {done}/{n} images, {time.time() - t_start:.0f}s", file=sys.stderr, flush=True)
    best = torch.zeros(n, dtype=torch.bool)
    for v in verified.values():
        best |= v
    bad = (best & attacked).nonzero().flatten().tolist()
    return {"eps": eps, "n": n, "clean_err": wrong.float().mean().item(), "pgd_err": attacked.float().mean().item(),
            "verified_err": {m: 1 - v.float().mean().item() for m, v in verified.items()},
            "best_verified_err": 1 - best.float().mean().item(), "seconds": seconds,
            "certified_but_attacked": len(bad), "certified_but_attacked_indices": bad[:100]}


def table(rows, methods):
    head = ["eps", "clean", "PGD"] + [f"{m} verified" for m in methods] + ["best verified"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['eps']:.4f}", f"{100 * r['clean_err']:.2f}%", f"{100 * r['pgd_err']:.2f}%"]
        cells += [f"{100 * r['verified_err'][m]:.2f}%" for m in methods] + [f"{100 * r['best_verified_err']:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_parser():
    """The command line's options, with their help."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a .pt file written by train.py, or a run folder (its last.pt)")
    ap.add_argument("--eps", default=None, help="default: the test eps the checkpoint was trained for (e.g. 8/255)")
    ap.add_argument("--eps-sweep", default=None, help="comma-separated eps list, one row each (e.g. 0.1,0.2,0.3)")
    ap.add_argument("--methods", default="ibp,crown-ibp",
                    help="comma-separated, any of ibp, crown-ibp, crown, alpha-crown (slowest and tightest last)")
    ap.add_argument("--alpha-steps", type=int, default=certmin.ALPHA_STEPS,
                    help="alpha-CROWN's optimisation steps per batch (0: CROWN's slopes)")
    ap.add_argument("--pgd-steps", type=int, default=200)
    ap.add_argument("--pgd-step-size", default=None, help="default eps/40")
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--pgd-precision", default="fp32", choices=PRECISIONS,
                    help="the arithmetic PGD searches in: fp32 (the default), tf32 (TF32 convolutions and matmuls; "
                         "CUDA only, float32 elsewhere), bf16 (bf16 autocast). Whatever it finds is judged in "
                         "--dtype: the PGD column counts only points misclassified there")
    ap.add_argument("--seed", type=int, default=0, help="seeds PGD's random starts (the same seed, the same report)")
    ap.add_argument("--n", type=int, default=0, help="evaluate the first n test images (default: all)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="the arithmetic of the clean and PGD columns; the bounds are always float64, made exact")
    ap.add_argument("--data", default=None, help="folder with the datasets (default: the one the run was trained "
                    "from, else ./data; the test split is downloaded there if missing)")
    ap.add_argument("--no-download", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap


def main(argv=None):
    ap = make_parser()
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in certmin.METHODS]
    if unknown or not methods:
        ap.error(f"--methods: unknown {unknown}; choose from {', '.join(certmin.METHODS)}")
    try:
        eps_list = [parse_eps(e) for e in args.eps_sweep.split(",")] if args.eps_sweep else (
            [parse_eps(args.eps)] if args.eps else None)
        step_size = parse_eps(args.pgd_step_size) if args.pgd_step_size else None
    except argparse.ArgumentTypeError as err:
        ap.error(str(err))
    try:
        cfg, model, x, y = load_model_and_test_set(args)
    except (DataError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    eps_list = eps_list or [cfg["eps"]]
    if args.n:
        x, y = x[:args.n], y[:args.n]
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    print(f"{args.checkpoint}: {cfg['method']} {cfg['model']} on {cfg['dataset']} (trained for eps {cfg['eps']:.4f}); "
          f"{len(y)} test images, {args.dtype}, {device}, PGD searched in {args.pgd_precision}", flush=True)
    torch.manual_seed(args.seed)
    rows = []
    with certmin.ieee(device.type):  # every pass in IEEE arithmetic (TF32's ~1e-3 could misjudge), but PGD's search
        for eps in eps_list:
            step = step_size if step_size is not None else eps / 40
            rows.append(certify(model, x, y, eps, methods, args.pgd_steps, step, args.restarts, args.batch_size, dtype,
                                device, args.alpha_steps, args.pgd_precision))
    print(table(rows, methods))
    print(f"{', '.join(methods)}: every certificate holds in exact arithmetic (certmin.sound_bounds)")
    for r in rows:
        print(f"time at eps {r['eps']:.4f}: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["seconds"].items()))
    bad = sum(r["certified_but_attacked"] for r in rows)
    if bad:
        print(f"\n!!! SOUNDNESS BUG: {bad} example(s) certified but misclassified by PGD "
              f"(first indices: {rows[0]['certified_but_attacked_indices'][:10]}). Please report it. !!!\n",
              file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(strict_json({"checkpoint": str(args.checkpoint), "config": cfg, "methods": methods, "dtype": args.dtype,
                                 "device": str(device), "pgd_steps": args.pgd_steps, "restarts": args.restarts,
                                 "pgd_precision": args.pgd_precision, "seed": args.seed, "exact_arithmetic": methods,
                                 "rows": rows, "certified_but_attacked": bad}, indent=1))
    return 1 if bad else 0


def load_model_and_test_set(args):
    """(config, model, test images, labels) for a checkpoint or a run folder (its last.pt); the data from
    --data, else the folder the run was trained from, else ./data. Only the test split is read."""
    if Path(args.checkpoint).is_dir():
        args.checkpoint = str(Path(args.checkpoint) / "last.pt")
    ck = load_checkpoint(args.checkpoint)
    cfg = ck["config"]
    model = build_model(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as err:
        raise DataError(f"{args.checkpoint}: the weights do not fit a {cfg.get('model')} ({str(err)[:200]})")
    data = args.data or (cfg["data"] if cfg.get("data") and Path(cfg["data"]).is_dir() else "data")
    x, y = load_data(cfg["dataset"], data, download=not args.no_download, test_only=True)
    return cfg, model, x, y


if __name__ == "__main__":
    sys.exit(main())
