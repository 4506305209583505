"""Where AdvIBP's updates go after the eps ramp: per step, the rule's branch (conflict or not), its
weights, the size of the combined gradient and of Adam's update, and how much the step lowered the
verified loss (same batch, and the first 1000 test images). Starts from a finished train.py run's
last.pt (model, Adam and TwoGradient state) and takes train.py's own steps at that run's last epoch.

    python -m results.advibp_weight_scale.measure runs/full/advibp/last.pt --data ../shared/data \
        --steps 234 --json results/advibp_weight_scale/seed0.json
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import certmin
import train


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--steps", type=int, default=234)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ck = train.load_checkpoint(args.checkpoint)
    cfg = train.complete_config(ck["config"])
    dev = torch.device("cpu")
    dist = train.Dist(dev)
    torch.manual_seed(cfg["seed"])
    model, opt, tg = train.prepare_training(cfg, dev, dist)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    tg.load_state_dict(ck["two_gradient"])
    run_step, _ = train.build_step(model, opt, tg, cfg, dev, dist)
    x_train, y_train, x_test, y_test = train.load_data(cfg["dataset"], args.data, download=False)
    xt, yt = x_test[:1000].float() / 255, y_test[:1000]
    bs, spe = cfg["batch_size"], len(y_train) // cfg["batch_size"]
    epoch = cfg["epochs"] - 1  # the run's last epoch: its batches, its schedule
    perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(cfg["seed"] * 100003 + epoch))
    params = list(model.parameters())

    def l_ver(x, y, eps):
        with torch.no_grad():
            return certmin.verified_loss(model, x, y, eps)[0].item()

    rows, t0 = [], time.time()
    for k in range(args.steps):
        idx = perm[k * bs:(k + 1) * bs]
        x, y = x_train[idx].float() / 255, y_train[idx]
        s = train.schedule(cfg, epoch + k / spe)
        before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        lv, lt = l_ver(x, y, s["eps_ver"]), l_ver(xt, yt, s["eps_ver"])
        rec = run_step(x, y, s)
        after = torch.cat([p.detach().reshape(-1) for p in params])
        combined = torch.cat([p.grad.reshape(-1) for p in params])
        rows.append({"conflict": bool(rec["conflict"]), "k_adv": float(rec["k_adv"]), "k_ver": float(rec["k_ver"]),
                     "k_reg": float(rec["k_reg"]), "g_adv_norm": float(rec["g_adv_norm"]),
                     "g_ver_norm": float(rec["g_ver_norm"]), "combined_norm": combined.norm().item(),
                     "update_norm": (after - before).norm().item(),
                     "d_lver_batch": l_ver(x, y, s["eps_ver"]) - lv, "d_lver_test": l_ver(xt, yt, s["eps_ver"]) - lt})
        if (k + 1) % 50 == 0:
            print(f"  {k + 1}/{args.steps} steps, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    summary = {}
    for name, sel in (("no conflict", [r for r in rows if not r["conflict"]]), ("conflict", [r for r in rows if r["conflict"]])):
        if not sel:
            continue
        med = lambda key: statistics.median(r[key] for r in sel)  # noqa: E731
        summary[name] = {"steps": len(sel), **{f"median_{key}": med(key) for key in
                         ("k_adv", "k_ver", "g_adv_norm", "g_ver_norm", "combined_norm", "update_norm")},
                         "sum_d_lver_batch": sum(r["d_lver_batch"] for r in sel),
                         "sum_d_lver_test": sum(r["d_lver_test"] for r in sel)}
    print(f"{args.checkpoint}: {args.steps} steps of epoch {epoch + 1}'s schedule ({s['phase']}, lr {s['lr']:.2e}, "
          f"eps_ver {s['eps_ver']}, c_t {s['c_t']})\n")
    print("| branch | steps | median k_adv | median k_ver | median ‖g_adv‖ | median ‖g_ver‖ | median ‖combined‖ "
          "| median ‖Adam update‖ | Σ ΔL_ver (batch) | Σ ΔL_ver (1000 test) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in summary.items():
        print(f"| {name} | {r['steps']} | {r['median_k_adv']:.3g} | {r['median_k_ver']:.3g} | {r['median_g_adv_norm']:.3g} "
              f"| {r['median_g_ver_norm']:.3g} | {r['median_combined_norm']:.3g} | {r['median_update_norm']:.3g} "
              f"| {r['sum_d_lver_batch']:+.4f} | {r['sum_d_lver_test']:+.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "summary": summary, "steps": rows}, indent=1))


if __name__ == "__main__":
    main()
