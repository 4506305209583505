"""Do certmin.bounds() hold under the caller's bf16 autocast? Run from the repository root:
    python -m results.bounds_under_autocast.check [--no-ieee]
--no-ieee calls the bound computation without the IEEE guard, as bounds() did before commit 536bdb9."""
import copy
import sys

import torch

import certmin

raw = "--no-ieee" in sys.argv
torch.manual_seed(0)
net = certmin.dm_small()
x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
C = certmin.margin_spec(y, 10)
net64 = copy.deepcopy(net).double()
with torch.no_grad():
    centre = (C.double() @ net64(x.double()).unsqueeze(-1)).squeeze(-1)  # the margins at the box centre, float64
    for eps in (1e-5, 1e-3):
        box = certmin.input_box(x, eps)
        for method in ("ibp", "crown-ibp", "crown"):
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    lb, ub = (certmin._bounds(net, *box, C, method, None, 20, 0.1) if raw
                              else certmin.bounds(net, *box, C, method))
            except RuntimeError as err:
                print(f"eps {eps:g} {method:9s}: failed: {err}")
                continue
            print(f"eps {eps:g} {method:9s}: lower bounds above the margin {int((lb.double() > centre).sum())}/{lb.numel()}, "
                  f"upper bounds below it {int((ub.double() < centre).sum())}/{ub.numel()}")
