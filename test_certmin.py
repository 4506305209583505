"""Tests of certmin.py: soundness of every bound (property-based), attacks, schedules, the two-gradient
rule and its distributed form. Real data and weights are read from ../shared (or $CERTMIN_SHARED)."""
import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import certmin

# torch.compile's CPU path warns about a deprecated torch.jit API inside torch itself
pytestmark = pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")
SHARED = Path(os.environ.get("CERTMIN_SHARED", Path(__file__).resolve().parent.parent / "shared"))
REQUIRE_SHARED = os.environ.get("CERTMIN_REQUIRE_SHARED") == "1"  # .ci/run sets it: nothing may skip there


def need_shared():
    """Skip a test that reads ../shared where it is absent (a clone on its own); fail instead under
    CERTMIN_REQUIRE_SHARED=1, so CI cannot pass by skipping."""
    missing = [p for p in ("data/mnist", "data/cifar10", "models") if not (SHARED / p).is_dir()]
    if missing:
        message = (f"{SHARED} has no {', '.join(missing)}: this test reads real data or trained networks. Set "
                   "CERTMIN_SHARED to a folder holding data/mnist (the four MNIST .gz files), "
                   "data/cifar10/cifar-10-batches-py and models/*.pth (see README)")
        (pytest.fail if REQUIRE_SHARED else pytest.skip)(message)


# Profiles: "ci" (the default) draws new random examples each run and prints, on a failure, the
# @reproduce_failure blob that replays it; "hard" runs every property test with thousands of examples
# (CERTMIN_HYPOTHESIS_EXAMPLES, default 2000):
#     CERTMIN_HYPOTHESIS=hard python -m pytest -q test_certmin.py -k "sound or reference or alpha or nested"
settings.register_profile("ci", print_blob=True)
settings.register_profile("hard", print_blob=True, max_examples=int(os.environ.get("CERTMIN_HYPOTHESIS_EXAMPLES", 2000)))
settings.load_profile(os.environ.get("CERTMIN_HYPOTHESIS", "ci"))
HARD = os.environ.get("CERTMIN_HYPOTHESIS") == "hard"


def examples(n):
    """n examples in CI, the profile's thousands under CERTMIN_HYPOTHESIS=hard."""
    return settings.default.max_examples if HARD else n


PROP = settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL64 = 1e-9   # relative tolerance (times 1 + the largest magnitude involved) in float64
TOL32 = 2e-5   # the same in float32
# float32 on random networks, further, relative to sums_scale (the size of the sums, which can be 10^5 times
# the outputs'): a quarter unit of float32 rounding. Why: 10 000 hypothesis examples found a
# 4-layer affine network, weights to 10, output -42, sums 8e5; float32's own forward pass is off by 1e-3
# there, and the bound by 0.0026, 0.05 units beyond TOL32 alone (6000 other examples: none beyond it).
# Logic errors are the float64 tests' to catch (TOL64): they run the same code.
TOL32_SUMS = torch.finfo(torch.float32).eps / 8


def autocast_on(device_type):
    try:
        return torch.is_autocast_enabled(device_type)  # torch >= 2.4
    except TypeError:  # requirements.txt allows torch 2.2, whose getter takes no device
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()

# ----------------------------------------------------------------------------------------------
# Random networks and boxes
# ----------------------------------------------------------------------------------------------


@st.composite
def networks(draw, max_classes=4, bn=False):
    """A random Sequential of Conv2d/Linear/ReLU/Flatten/Normalize layers, an input batch and a label
    batch. Weight scales up to 10, strides, padding, dilation, groups, and affine layers without a
    ReLU between them. bn: also BatchNorm after some hidden Conv2d/Linear layers (random scales of either
    sign, running statistics and eps; eval mode: net.train() and certmin.batch_stats for training)."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    ch, side = draw(st.integers(1, 2)), draw(st.integers(3, 7))
    layers = []
    if draw(st.booleans()):
        layers.append(certmin.Normalize(torch.rand(ch, generator=g).tolist(),
                                        (0.2 + torch.rand(ch, generator=g)).tolist()))
    c, s = ch, side
    for _ in range(draw(st.integers(0, 2))):
        k = draw(st.integers(1, min(3, s)))
        stride, pad = draw(st.integers(1, 2)), draw(st.integers(0, 1))
        dil = draw(st.integers(1, 2)) if s + 2 * pad - 2 * (k - 1) - 1 >= 0 else 1
        out = draw(st.integers(1, 4))
        groups = 2 if c % 2 == 0 and out % 2 == 0 and draw(st.booleans()) else 1
        layers.append(nn.Conv2d(c, out, k, stride, pad, dilation=dil, groups=groups))
        c, s = out, (s + 2 * pad - dil * (k - 1) - 1) // stride + 1
        if bn and draw(st.booleans()):
            layers.append(nn.BatchNorm2d(out, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1]))))
        if draw(st.integers(0, 3)) > 0:
            layers.append(nn.ReLU())
    layers.append(nn.Flatten())
    n = c * s * s
    for _ in range(draw(st.integers(0, 2))):
        out = draw(st.integers(1, 8))
        layers.append(nn.Linear(n, out))
        n = out
        if bn and draw(st.booleans()):
            layers.append(nn.BatchNorm1d(out, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1]))))
        if draw(st.integers(0, 3)) > 0:
            layers.append(nn.ReLU())
    classes = draw(st.integers(2, max_classes))
    layers.append(nn.Linear(n, classes))
    net = nn.Sequential(*layers).double()
    scale = draw(st.sampled_from([0.3, 1.0, 3.0, 10.0]))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale / math.sqrt(p[0].numel()))
        for m in net:
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) * 3)
    net.eval()
    batch = draw(st.integers(1, 3))
    x = torch.rand(batch, ch, side, side, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    return net, x, y, classes


def spec_out(net, pts, C):
    z = net(pts)
    return z if C is None else (C @ z.unsqueeze(-1)).squeeze(-1)


def attack_bound(net, xl, xu, C, steps=25):
    """Points inside the box that push each specification row down and up: PGD against the bound."""
    N = xl.shape[0]
    S = (C.shape[1] if C is not None else net(xl[:1]).shape[1])
    rows = torch.arange(S).repeat(2)
    sign = torch.cat([torch.ones(S), -torch.ones(S)]).to(xl.dtype)
    lo, hi = xl.repeat_interleave(2 * S, 0), xu.repeat_interleave(2 * S, 0)
    Cr = C.repeat_interleave(2 * S, 0) if C is not None else None
    x = lo + (hi - lo) * torch.rand_like(lo)
    for k in range(steps):
        x.requires_grad_(True)
        out = spec_out(net, x, Cr).view(N, 2 * S, -1)[:, torch.arange(2 * S), rows]
        g, = torch.autograd.grad((out * sign).sum(), x)
        step = (hi - lo) * 0.25 * (1 - k / steps)
        x = torch.min(torch.max(x.detach() - step * g.sign(), lo), hi)
    return x.view(N, 2 * S, *xl.shape[1:])


def sample_points(net, xl, xu, C, n=48):
    """(N, P, *shape): uniform points, random box corners and attacked points for every example."""
    N = xl.shape[0]
    shape = xl.shape[1:]
    u = torch.rand(N, n, *shape, dtype=xl.dtype)
    corners = (torch.rand(N, n, *shape) < 0.5).to(xl.dtype)
    lo, hi = xl.unsqueeze(1), xu.unsqueeze(1)
    pts = [lo + (hi - lo) * u, lo + (hi - lo) * corners, attack_bound(net, xl, xu, C)]
    return torch.cat(pts, 1)


def sums_scale(net, xl, xu, C):
    """1 + the largest entry of |C| |f|(max(|xl|, |xu|)), |f| the network with |W|, |b| and (x + |mean|) / std:
    the size of the sums that computing C f(x) adds up, to which float rounding is proportional
    (an inner product errs by at most gamma_n |a| . |b|). Where f's sums cancel it is far above |C f(x)|."""
    absnet = copy.deepcopy(net)
    with torch.no_grad():
        for m in absnet:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.abs_()
                if m.bias is not None:
                    m.bias.abs_()
            elif isinstance(m, certmin.Normalize):
                m.mean.copy_(-m.mean.abs())
        z = absnet(torch.maximum(xl.abs(), xu.abs()))
        return 1 + (z if C is None else (C.abs() @ z.unsqueeze(-1)).squeeze(-1)).max().item()


def assert_contains(net, xl, xu, C, lb, ub, tol, sums=0.0):
    """Every sampled and attacked output lies within tol * scale + sums of [lb, ub], scale = 1 + the
    largest |output| or |bound|; sums: an allowance for rounding where f's sums cancel (sums_scale)."""
    pts = sample_points(net, xl, xu, C)
    N, P = pts.shape[:2]
    Cr = C.repeat_interleave(P, 0) if C is not None else None
    with torch.no_grad():
        out = spec_out(net, pts.flatten(0, 1), Cr).view(N, P, -1)
    scale = 1 + max(out.abs().max().item(), lb.abs().max().item(), ub.abs().max().item())
    low_gap = (lb.unsqueeze(1) - out).max().item()
    high_gap = (out - ub.unsqueeze(1)).max().item()
    assert low_gap <= tol * scale + sums, f"lower bound exceeds an output by {low_gap}"
    assert high_gap <= tol * scale + sums, f"upper bound below an output by {high_gap}"


# ----------------------------------------------------------------------------------------------
# Soundness
# ----------------------------------------------------------------------------------------------


@PROP
@given(networks(), st.floats(0, 0.5), st.sampled_from(certmin.METHODS), st.booleans())
def test_bounds_are_sound(case, eps, method, with_C):
    net, x, y, classes = case
    C = certmin.margin_spec(y, classes).double() if with_C else None
    xl, xu = certmin.input_box(x, eps)
    lb, ub = certmin.bounds(net, xl, xu, C, method)
    assert lb.shape == ub.shape == (len(x), classes - 1 if with_C else classes)
    assert_contains(net, xl, xu, C, lb, ub, TOL64)


@settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), st.floats(0, 0.3), st.sampled_from(certmin.METHODS))
def test_bounds_are_sound_in_float32(case, eps, method):
    net, x, y, classes = case
    net, x = net.float(), x.float()
    C = certmin.margin_spec(y, classes)
    xl, xu = certmin.input_box(x, eps)
    lb, ub = certmin.bounds(net, xl, xu, C, method)
    assert lb.dtype == torch.float32
    assert_contains(net, xl, xu, C, lb, ub, TOL32, TOL32_SUMS * sums_scale(net, xl, xu, C))


@settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), st.sampled_from([1e-5, 1e-3, 0.1]), st.sampled_from(certmin.METHODS))
def test_bounds_ignore_the_callers_autocast_and_reduced_precision(case, eps, method):
    """Inside bf16 autocast and with bf16 matmuls allowed, bounds() computes exactly what it computes
    outside (IEEE float32), so its bounds stay sound; the caller's settings are back afterwards."""
    net, x, y, classes = case
    net, x = net.float(), x.float()
    C = certmin.margin_spec(y, classes)
    xl, xu = certmin.input_box(x, eps)
    plain = certmin.bounds(net, xl, xu, C, method)
    try:
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = certmin.bounds(net, xl, xu, C, method)
            assert autocast_on("cpu") and torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert all(torch.equal(a, b) for a, b in zip(plain, inside))
    assert_contains(net, xl, xu, C, *inside, TOL32, TOL32_SUMS * sums_scale(net, xl, xu, C))


PER_OPERATOR = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")  # torch >= 2.9


def test_bounds_switch_off_tf32_and_restore_it(monkeypatch):
    """Inside bounds(): no TF32 and no bf16, set through the legacy switches or torch's per-operator
    fp32_precision, whichever the caller used; afterwards exactly the caller's settings."""
    seen, inner = [], certmin._bounds

    def spy(*a):
        knobs = [getattr(b, n, None) for b in (torch.backends.cudnn, torch.backends.mkldnn) for n in ("conv", "matmul")]
        seen.append({getattr(k, "fp32_precision", "ieee") for k in knobs} - {"none"})  # none: IEEE unless a parent says
        return inner(*a)
    monkeypatch.setattr(certmin, "_bounds", spy)
    net, x = small_net(), torch.rand(2, 1, 3, 4)
    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        certmin.bounds(net, *certmin.input_box(x, 0.1))
        assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == (True, "medium")
        if PER_OPERATOR:
            assert seen[-1] <= {"ieee"}
            torch.set_float32_matmul_precision("highest")
            torch.backends.cudnn.conv.fp32_precision = "ieee"  # now the legacy getters refuse to answer
            torch.backends.mkldnn.conv.fp32_precision = "bf16"
            certmin.bounds(net, *certmin.input_box(x, 0.1))
            assert seen[-1] == {"ieee"}
            assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.mkldnn.conv.fp32_precision) == ("ieee", "bf16")
    finally:
        if PER_OPERATOR:
            torch.backends.cudnn.conv.fp32_precision = "tf32"  # torch's defaults: consistent for the legacy getters
            torch.backends.mkldnn.conv.fp32_precision = "none"
        torch.backends.cudnn.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])
    assert len(seen) == 2 or not PER_OPERATOR


@PROP
@given(networks(), st.sampled_from(certmin.METHODS), st.booleans())
def test_zero_eps_gives_the_forward_output(case, method, with_C):
    net, x, y, classes = case
    C = certmin.margin_spec(y, classes).double() if with_C else None
    lb, ub = certmin.bounds(net, x, x, C, method)
    out = spec_out(net, x, C).detach()
    tol = TOL64 * (1 + out.abs().max().item())
    assert (lb - out).abs().max() <= tol and (ub - out).abs().max() <= tol


@PROP
@given(networks(), st.floats(0, 0.25), st.floats(0, 0.25), st.booleans())
def test_ibp_bounds_are_nested_for_nested_boxes(case, eps, extra, with_C):
    net, x, y, classes = case
    C = certmin.margin_spec(y, classes).double() if with_C else None
    lb1, ub1 = certmin.bounds(net, *certmin.input_box(x, eps), C)
    lb2, ub2 = certmin.bounds(net, *certmin.input_box(x, eps + extra), C)
    tol = TOL64 * (1 + max(lb2.abs().max().item(), ub2.abs().max().item()))
    assert (lb2 - lb1).max() <= tol and (ub1 - ub2).max() <= tol


@PROP
@given(networks(), st.floats(0, 0.5), st.sampled_from(certmin.METHODS))
def test_elided_margins_are_at_least_as_tight_as_logit_differences(case, eps, method):
    """A theorem for IBP (C W is applied to one interval), and for the CROWN methods when one ReLU layer
    separates the input from the logits: there each margin row's relaxation is, neuron by neuron, at
    least as tight as the two logit rows'. With two or more ReLU layers the rows' sign patterns differ
    below the last one and neither side dominates: the hard profile found a two-ReLU network where
    CROWN-IBP's elided margin bound was 0.14 below the logit difference (both sound), which the CI
    profile would hit once in a while. alpha-CROWN optimises each row on its own: not a property there."""
    net, x, y, classes = case
    relu_layers = sum(isinstance(m, nn.ReLU) for m in net)
    if method == "alpha-crown" or (method != "ibp" and relu_layers > 1):
        method = "ibp"
    xl, xu = certmin.input_box(x, eps)
    C = certmin.margin_spec(y, classes).double()
    m_lb, _ = certmin.bounds(net, xl, xu, C, method)
    z_lb, z_ub = certmin.bounds(net, xl, xu, None, method)
    others = torch.stack([torch.tensor([j for j in range(classes) if j != t]) for t in y.tolist()])
    diff = z_lb.gather(1, y[:, None]) - z_ub.gather(1, others)
    tol = TOL64 * (1 + diff.abs().max().item())
    assert (diff - m_lb).max() <= tol


def test_margin_bounds_with_a_normalize_layer_and_one_sample():
    """The box is in pixel space even when Normalize rescales channels by 1/std = 5."""
    net = nn.Sequential(certmin.Normalize([0.5], [0.2]), nn.Flatten(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
        net[2].bias.zero_()
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    lb, ub = certmin.bounds(net, *certmin.input_box(x, 0.1))
    assert torch.allclose(lb[0], torch.tensor([-0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(ub[0], torch.tensor([0.5, 0.0], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# CROWN-IBP and CROWN against an independent dense reference (Zhang et al. 2020 definitions)
# ----------------------------------------------------------------------------------------------


def dense(net, shape):
    """Every layer as ("relu",) or ("affine", W, b) on flattened vectors, built by probing the layer
    with basis vectors: no shared code with certmin's transposed convolutions."""
    out = []
    for m in net:
        if isinstance(m, nn.ReLU):
            out.append(("relu",))
            continue
        n = math.prod(shape)
        with torch.no_grad():
            b = m(torch.zeros(1, *shape, dtype=torch.float64))
            W = (m(torch.eye(n, dtype=torch.float64).view(n, *shape)) - b).flatten(1).T
        out.append(("affine", W, b.flatten()))
        shape = b.shape[1:]
    return out


def reference_bounds(net, xl, xu, C, full, textbook=False):
    """Lower bound of C f over the box, one example: IBP for intermediate bounds (or, when full, IBP
    from the layer before intersected with CROWN for unstable neurons; CROWN alone when textbook),
    and a CROWN backward pass with the adaptive relaxation for the output."""
    layers = dense(net, xl.shape)
    xl, xu = xl.flatten(), xu.flatten()

    def backward(L, upto, pre):
        bias = torch.zeros(L.shape[0], dtype=torch.float64)
        for i in range(upto - 1, -1, -1):
            if layers[i][0] == "affine":
                bias, L = bias + L @ layers[i][2], L @ layers[i][1]
            else:
                l, u = pre[i]
                dl, du, bu = torch.zeros_like(l), torch.zeros_like(l), torch.zeros_like(l)
                for j in range(len(l)):
                    if l[j] >= 0:
                        dl[j] = du[j] = 1
                    elif u[j] > 0:
                        du[j] = u[j] / (u[j] - l[j])
                        bu[j] = -l[j] * u[j] / (u[j] - l[j])
                        dl[j] = 1.0 if u[j] > -l[j] else 0.0
                bias = bias + L.clamp(max=0) @ bu
                L = L.clamp(min=0) * dl + L.clamp(max=0) * du
        return L.clamp(min=0) @ xl + L.clamp(max=0) @ xu + bias

    pre, l, u = {}, xl, xu
    for i, layer in enumerate(layers):  # intermediate bounds layer by layer
        if layer[0] == "relu":
            if full and sum(lay[0] == "affine" for lay in layers[:i]) > 1:
                n = len(l)
                eye = torch.eye(n, dtype=torch.float64)
                lc, uc = backward(eye, i, pre), -backward(-eye, i, pre)
                if textbook:
                    l, u = lc, uc
                else:
                    unstable = (l < 0) & (u > 0)
                    l, u = torch.where(unstable, torch.max(l, lc), l), torch.where(unstable, torch.min(u, uc), u)
            pre[i] = (l, u)
            l, u = l.clamp(min=0), u.clamp(min=0)
        else:
            W, b = layer[1], layer[2]
            c, r = W @ ((u + l) / 2) + b, W.abs() @ ((u - l) / 2)
            l, u = c - r, c + r
    return backward(C, len(layers), pre)


def textbook_crown(net, xl, xu, C):
    """Plain CROWN, the definition before certmin's savings: every neuron of every ReLU after the first
    affine layer gets its own backward pass (one-hot rows, dense), and keeps its CROWN bounds alone."""
    layers = certmin._layers(net)
    _, _, pre, shapes = certmin._ibp(layers, xl, xu, C, record=True)
    N = len(xl)
    for i in sorted(pre):
        if certmin._affine_count(layers[:i]) > 1:  # one affine map before it: IBP is exact
            n = math.prod(shapes[i])
            E = torch.eye(n, dtype=xl.dtype).expand(N, n, n)
            A = torch.cat([E, -E], 1).reshape(N, 2 * n, *shapes[i])
            lb = certmin._concretize(*certmin._backward(layers, A, pre, shapes, i), xl, xu)
            pre[i] = (lb[:, :n].view(N, *shapes[i]), -lb[:, n:].view(N, *shapes[i]))
    A = torch.cat([C, -C], 1).to(xl.dtype)
    return certmin._concretize(*certmin._backward(layers, A, pre, shapes, len(layers)), xl, xu)[:, :C.shape[1]]


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), st.floats(0, 0.5), st.sampled_from(["crown-ibp", "crown", "textbook"]))
def test_crown_ibp_and_crown_equal_the_reference(case, eps, method):
    net, x, y, classes = case
    C = certmin.margin_spec(y, classes).double()
    xl, xu = certmin.input_box(x, eps)
    lb = textbook_crown(net, xl, xu, C) if method == "textbook" else certmin.bounds(net, xl, xu, C, method)[0]
    for n in range(len(x)):
        ref = reference_bounds(net, xl[n], xu[n], C[n], method != "crown-ibp", method == "textbook")
        assert torch.allclose(lb[n], ref, rtol=1e-9, atol=1e-9 * (1 + ref.abs().max().item()))


@PROP
@given(networks(), st.floats(0, 0.5), st.integers(0, 6))
def test_alpha_crown_is_never_looser_than_crown_and_sound_for_any_alpha(case, eps, steps):
    net, x, y, classes = case
    C = certmin.margin_spec(y, classes).double()
    xl, xu = certmin.input_box(x, eps)
    crown, crown_ub = certmin.bounds(net, xl, xu, C, "crown")
    alpha, alpha_ub = certmin.bounds(net, xl, xu, C, "alpha-crown", alpha_steps=steps, alpha_lr=0.5)
    tol = TOL64 * (1 + crown.abs().max().item() + crown_ub.abs().max().item())
    assert (alpha >= crown - tol).all() and (alpha_ub <= crown_ub + tol).all()
    if steps == 0:
        assert torch.allclose(alpha, crown, rtol=1e-9, atol=tol)
    assert_contains(net, xl, xu, C, alpha, alpha_ub, TOL64)


def test_alpha_crown_in_chunks_of_examples_gives_the_same_bounds(monkeypatch):
    """alpha-CROWN optimises examples in chunks (ALPHA_BUDGET): examples are independent, so chunking
    changes nothing but the rounding of batched convolutions."""
    torch.manual_seed(2)
    net = certmin.dm_small(side=12).double()
    x, y = torch.rand(7, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (7,))
    C, box = certmin.margin_spec(y, 10).double(), certmin.input_box(x, 0.03)
    whole = certmin.bounds(net, *box, C, "alpha-crown", alpha_steps=5)
    monkeypatch.setattr(certmin, "ALPHA_BUDGET", 1)  # one example at a time
    alone = certmin.bounds(net, *box, C, "alpha-crown", alpha_steps=5)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(whole, alone))
    assert (whole[0] > certmin.bounds(net, *box, C, "crown")[0] + 1e-9).any()  # the optimisation did something


def test_fused_compiled_relu_step_equals_eager(monkeypatch):
    """The torch.compile path (used on large tensors) gives the same bounds and gradients as eager."""
    torch.manual_seed(8)
    net = certmin.dm_small(side=12)
    x, y = torch.rand(6, 1, 12, 12), torch.randint(0, 10, (6,))
    results = []
    for threshold in [0, 1]:  # 0: never compile; 1: compile every ReLU step
        monkeypatch.setattr(certmin, "COMPILE_MIN", threshold)
        net.zero_grad()
        loss, _ = certmin.verified_loss(net, x, y, 0.05, beta=1.0)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in net.parameters()])
    assert certmin._compiled.get(certmin._relu_step_forward) not in (None, False), "compiling must have worked"
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ibp_relu_function_gives_autograds_numbers_eager_and_compiled(monkeypatch):
    """_IbpRelu (the fused IBP ReLU) against autograd on the plain formula: the same bounds and
    gradients, bit for bit when eager, and to float32 rounding when compiled; float64 gradcheck."""
    torch.manual_seed(9)
    c, r = torch.randn(16, 4, 6, 6), torch.rand(16, 4, 6, 6)
    c[0, 0, 0, :3], r[0, 0, 0, :3] = torch.tensor([0.5, -0.5, 0.0]), torch.tensor([0.5, 0.5, 0.0])  # kinks at 0
    g = torch.randn(16, 4, 6, 6), torch.randn(16, 4, 6, 6)

    def plain(c, r):
        l, u = (c - r).clamp(min=0), (c + r).clamp(min=0)
        return (u + l) / 2, (u - l) / 2

    def run(f, c, r):
        c, r = c.clone().requires_grad_(True), r.clone().requires_grad_(True)
        out = f(c, r)
        return [*out, *torch.autograd.grad(out, (c, r), g)]

    reference = run(plain, c, r)
    for threshold, exact in ((0, True), (1, False)):  # 0: eager; 1: compiled
        monkeypatch.setattr(certmin, "COMPILE_MIN", threshold)
        for a, b in zip(reference, run(certmin._IbpRelu.apply, c, r)):
            assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert certmin._compiled.get(certmin._ibp_relu_forward) not in (None, False), "compiling must have worked"
    monkeypatch.setattr(certmin, "COMPILE_MIN", 0)
    c64, r64 = torch.randn(3, 5, dtype=torch.float64), torch.rand(3, 5, dtype=torch.float64) + 0.1
    assert torch.autograd.gradcheck(certmin._IbpRelu.apply, (c64.requires_grad_(), r64.requires_grad_()))


def test_crown_is_tighter_than_ibp_on_a_real_network():
    net = load_shared_model("mnist_fc_3layer.pth")
    x, y = mnist_test(16)
    C = certmin.margin_spec(y, 10)
    box = certmin.input_box(x, 0.02)
    lb = {m: certmin.bounds(net, *box, C, m)[0] for m in certmin.METHODS}
    assert (lb["crown"] >= lb["ibp"] - 1e-4).all()
    assert lb["crown"].mean() > lb["crown-ibp"].mean() > lb["ibp"].mean()
    calls = []
    certmin.bounds(net, *box, C, "crown", progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (64, 64) and all(a < b for (a, _), (b, _) in zip(calls, calls[1:]))


def test_unsupported_layer_names_itself_and_the_supported_ones():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.rand(1, 4)
    with pytest.raises(TypeError, match=r"Tanh.*supported layers: Linear, Conv2d, ReLU, Flatten, Normalize"):
        certmin.bounds(net, x, x)
    with pytest.raises(ValueError, match="unknown bound method 'lp'"):
        certmin.bounds(nn.Sequential(nn.Linear(4, 2)), x, x, method="lp")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        certmin.input_box(x, -0.1)
    with pytest.raises(ValueError, match="empty"):
        certmin.bounds(nn.Sequential(nn.Linear(4, 2)), x + 1, x)


# ----------------------------------------------------------------------------------------------
# The verified loss
# ----------------------------------------------------------------------------------------------


def test_margin_spec_and_input_box():
    C = certmin.margin_spec(torch.tensor([2, 0]), 3)
    assert C.tolist() == [[[-1, 0, 1], [0, -1, 1]], [[1, -1, 0], [1, 0, -1]]]
    xl, xu = certmin.input_box(torch.tensor([0.05, 0.5, 0.98]), 0.1)
    assert torch.allclose(xl, torch.tensor([0.0, 0.4, 0.88])) and torch.allclose(xu, torch.tensor([0.15, 0.6, 1.0]))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_verified_loss_gradcheck_float64(beta):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5), nn.ReLU(),
                        nn.Linear(5, 3)).double()
    x = (0.2 + 0.6 * torch.rand(2, 1, 4, 4, dtype=torch.float64)).requires_grad_(True)
    y = torch.tensor([0, 2])

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return certmin.verified_loss(self.net, x, y, 0.05, beta=beta)[0]

    wrapper = Loss()
    names = [n for n, _ in wrapper.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in wrapper.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(wrapper, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def test_verified_loss_matches_its_definition():
    torch.manual_seed(2)
    net = certmin.dm_small(side=12)
    x, y = torch.rand(5, 1, 12, 12), torch.randint(0, 10, (5,))
    loss, verified = certmin.verified_loss(net, x, y, 0.01, beta=0.25)
    box, C = certmin.input_box(x, 0.01), certmin.margin_spec(y, 10)
    m = 0.25 * certmin.bounds(net, *box, C, "crown-ibp")[0] + 0.75 * certmin.bounds(net, *box, C, "ibp")[0]
    logits = torch.cat([torch.zeros(5, 1), -m], 1)  # class y first: CE is invariant to the order
    assert torch.allclose(loss, F.cross_entropy(logits, torch.zeros(5, dtype=torch.long)), atol=1e-5)
    assert verified.tolist() == (m > 0).all(1).tolist()


# ----------------------------------------------------------------------------------------------
# Bounds in exact arithmetic: sound_bounds against IBP in rational numbers
# ----------------------------------------------------------------------------------------------


def exact_ibp(net, xl, xu, C=None):
    """IBP of one example in exact rational arithmetic (fractions.Fraction), from the float weights as
    they are: the reference every float bound is judged against. Shares no code with certmin: a Conv2d
    becomes its dense matrix by probing it, bias-free, with basis vectors in float64 (every entry is one
    product by 1, exact); Linear, Flatten, ReLU and Normalize are written out. BatchNorm (eval mode): its
    scale w / sqrt(var + eps) is irrational in general, so it enters as a rational interval 2^-200 wide
    (exact_bn): the result still contains the exact one, and a bound that misses it by less than that
    would be a bound with no room for rounding at all."""
    from fractions import Fraction as Q
    layers = [layer for m in net for layer in (m if isinstance(m, nn.Sequential) else [m])]
    shape, lo, hi = xl.shape, [Q(v) for v in xl.flatten().tolist()], [Q(v) for v in xu.flatten().tolist()]

    def affine(rows, bias, lo, hi):  # rows: [(j, w), ...] per output, w != 0
        # in integers over common denominators (floats are dyadic): exact, and far faster than Fractions
        dx = math.lcm(*(v.denominator for v in lo + hi))
        rows = [[(j, w.as_integer_ratio()) for j, w in row] for row in rows]  # w: a float or a Fraction
        dw = math.lcm(1, *(d for row in rows for _, (_, d) in row))
        li, hi_ = [v.numerator * (dx // v.denominator) for v in lo], [v.numerator * (dx // v.denominator) for v in hi]
        rows = [[(j, n * (dw // d)) for j, (n, d) in row] for row in rows]
        return ([b + Q(sum(w * (li[j] if w > 0 else hi_[j]) for j, w in row), dx * dw) for row, b in zip(rows, bias)],
                [b + Q(sum(w * (hi_[j] if w > 0 else li[j]) for j, w in row), dx * dw) for row, b in zip(rows, bias)])

    def sparse(W):  # rows of (column, weight) for the nonzero weights, found by torch (row-major order)
        rows = [[] for _ in range(len(W))]
        for (i, j), w in zip(W.nonzero().tolist(), W[W != 0].tolist()):
            rows[i].append((j, w))
        return rows

    for i, m in enumerate(layers):
        if isinstance(m, nn.ReLU):
            lo, hi = [max(v, 0) for v in lo], [max(v, 0) for v in hi]
        elif isinstance(m, nn.Flatten):
            shape = (math.prod(shape),)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            lo, hi = exact_bn(m, lo, hi, math.prod(shape[1:]))
        elif isinstance(m, certmin.Normalize):
            per = math.prod(shape[1:])
            mean = [Q(v) for v in m.mean.flatten().tolist()]
            std = [Q(v) for v in m.std.flatten().tolist()]
            lo = [(v - mean[j // per]) / std[j // per] for j, v in enumerate(lo)]
            hi = [(v - mean[j // per]) / std[j // per] for j, v in enumerate(hi)]
        elif isinstance(m, nn.Conv2d):
            n = math.prod(shape)
            with torch.no_grad():
                out = F.conv2d(torch.eye(n, dtype=torch.float64).view(n, *shape), m.weight.double(), None,
                               m.stride, m.padding, m.dilation, m.groups)
            shape = out.shape[1:]
            bias = [Q(0)] * math.prod(shape) if m.bias is None else \
                [Q(b) for b in m.bias.double().repeat_interleave(math.prod(shape[1:])).tolist()]
            lo, hi = affine(sparse(out.flatten(1).T), bias, lo, hi)
        else:  # Linear; with C as the last layer, elided: rows C W and bias C b, exactly
            rows = m.weight.tolist()
            bias = [Q(b) for b in m.bias.tolist()] if m.bias is not None else [Q(0)] * len(rows)
            if C is not None and i == len(layers) - 1:
                Cq = [[Q(c) for c in row] for row in C.tolist()]
                rows = [[sum(c * Q(row[j]) for c, row in zip(crow, rows)) for j in range(len(rows[0]))] for crow in Cq]
                bias = [sum(c * b for c, b in zip(crow, bias)) for crow in Cq]
                C = None
            lo, hi = affine([[(j, w) for j, w in enumerate(row) if w != 0] for row in rows], bias, lo, hi)
            shape = (len(rows),)
    if C is not None:
        lo, hi = affine(sparse(C), [Q(0)] * len(C), lo, hi)
    return lo, hi


def exact_bn(m, lo, hi, per, bits=200):
    """BatchNorm (eval) over rational intervals [lo, hi] (per values per channel): y = s (x - mean) + b with
    s = w / sqrt(var + eps) in a rational interval from integer square roots, multiplied as intervals."""
    from fractions import Fraction as Q
    outs_lo, outs_hi = [], []
    w = m.weight.tolist() if m.affine else [1.0] * m.num_features
    b = m.bias.tolist() if m.affine else [0.0] * m.num_features
    scales = []
    for ch, (mean, var) in enumerate(zip(m.running_mean.tolist(), m.running_var.tolist())):
        q = Q(var) + Q(m.eps)
        root = math.isqrt(q.numerator * q.denominator * 4 ** bits)
        den = q.denominator * 2 ** bits
        r_lo, r_hi = Q(root, den), Q(root + 1, den)  # r_lo <= sqrt(var + eps) <= r_hi
        s = sorted([Q(w[ch]) / r_lo, Q(w[ch]) / r_hi])
        scales.append((s, Q(mean), Q(b[ch])))
    for j, (a, z) in enumerate(zip(lo, hi)):
        (s0, s1), mean, bias = scales[j // per]
        prods = [s0 * (a - mean), s0 * (z - mean), s1 * (a - mean), s1 * (z - mean)]
        outs_lo.append(min(prods) + bias)
        outs_hi.append(max(prods) + bias)
    return outs_lo, outs_hi


def assert_encloses_exact(net, xl, xu, C, lb, ub):
    from fractions import Fraction as Q
    for k in range(len(xl)):
        lo, hi = exact_ibp(net, xl[k], xu[k], None if C is None else C[k])
        assert all(Q(a) <= b for a, b in zip(lb[k].tolist(), lo)), "a lower bound exceeds exact IBP's"
        assert all(Q(a) >= b for a, b in zip(ub[k].tolist(), hi)), "an upper bound is below exact IBP's"


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(networks(), networks(bn=True)), st.floats(0, 0.3), st.booleans(), st.sampled_from(["float32", "float64"]),
       st.sampled_from([torch.float32, torch.float64]))
def test_sound_ibp_encloses_exact_ibp(case, eps, with_C, weights, arithmetic):
    """sound_bounds' IBP holds in exact arithmetic: it contains IBP computed in rationals from the same
    float weights and box, for float32 and float64 networks, in float32 or float64 arithmetic (BatchNorm's
    scale and shift rounded too)."""
    net, x, y, classes = case
    if weights == "float32":
        net, x = net.float(), x.float()
    elif arithmetic == torch.float32:
        arithmetic = torch.float64  # float32 arithmetic would round float64 weights: refused (tested below)
    C = certmin.margin_spec(y, classes).to(x.dtype) if with_C else None
    xl, xu = certmin.input_box(x, eps, outward=True)
    lb, ub = certmin.sound_bounds(net, xl, xu, C, dtype=arithmetic)
    assert lb.dtype == ub.dtype == arithmetic and lb.shape == (len(x), classes - 1 if with_C else classes)
    assert_encloses_exact(net, xl, xu, C, lb, ub)


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(networks(), networks(bn=True)), st.sampled_from([0.0, 1e-6, 0.01, 0.1]), st.booleans(),
       st.sampled_from(["float32", "float64"]), st.sampled_from(certmin.SOUND_METHODS))
def test_sound_bounds_contain_the_exact_outputs_at_points(case, eps, with_C, weights, method):
    """Every sampled or attacked point's output, computed in rationals, lies within sound_bounds (with
    BatchNorm, the output's rational enclosure). At eps 0 the bounds are the output itself up to
    rounding, so a rounding left uncharged shows here."""
    from fractions import Fraction as Q
    net, x, y, classes = case
    if weights == "float32":
        net, x = net.float(), x.float()
    C = certmin.margin_spec(y, classes).to(x.dtype) if with_C else None
    xl, xu = certmin.input_box(x, eps, outward=True)
    lb, ub = certmin.sound_bounds(net, xl, xu, C, method)
    pts = torch.cat([x.unsqueeze(1), sample_points(net, xl, xu, C, n=3)], 1)
    pts = torch.min(torch.max(pts, xl.unsqueeze(1)), xu.unsqueeze(1))
    for k in range(len(x)):
        for p in pts[k]:
            lo, hi = exact_ibp(net, p, p, None if C is None else C[k])
            assert all(Q(a) <= v for a, v in zip(lb[k].tolist(), lo)), "a lower bound exceeds an exact output"
            assert all(Q(a) >= v for a, v in zip(ub[k].tolist(), hi)), "an upper bound is below an exact output"


@PROP
@given(networks(), st.floats(0, 0.3), st.booleans(), st.sampled_from(certmin.SOUND_METHODS))
def test_sound_bounds_in_float64_are_the_methods_within_rounding(case, eps, with_C, method):
    """The widening is a bound on rounding, not slack: within 1e-9 of the scale of float64 bounds()."""
    net, x, y, classes = case
    C = certmin.margin_spec(y, classes).double() if with_C else None
    xl, xu = certmin.input_box(x, eps)
    lb, ub = certmin.bounds(net, xl, xu, C, method)
    slb, sub = certmin.sound_bounds(net, xl, xu, C, method)
    scale = 1 + max(lb.abs().max().item(), ub.abs().max().item())
    if method in ("crown", "alpha-crown"):  # their intermediate bounds, sound IBP's boxes too, may also be tighter
        assert (slb - lb).max().item() <= 1e-9 * scale and (ub - sub).max().item() <= 1e-9 * scale
    else:
        assert (slb <= lb).all() and (sub >= ub).all()
    assert (lb - slb).max().item() <= 1e-9 * scale and (sub - ub).max().item() <= 1e-9 * scale


@settings(max_examples=examples(60), deadline=None)
@given(st.floats(0.1, 10), st.floats(0.1, 1), st.sampled_from([torch.float32, torch.float64]),
       st.sampled_from(certmin.SOUND_METHODS))
def test_sound_bounds_charge_cancellation_in_a_product(a, v, dtype, method):
    """f(x) = 3 a x - fl(3 a) x: every float product of the weights cancels to 0, the exact function
    does not. Only the charge for the rounding of that product (not the output's size) covers it."""
    from fractions import Fraction as Q
    net = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Linear(2, 1, bias=False)).to(dtype)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[a], [1.0]], dtype=dtype))
        net[1].weight.copy_(torch.tensor([[3.0, -(3 * torch.tensor(a, dtype=dtype)).item()]], dtype=dtype))
    x = torch.tensor([[v]], dtype=dtype)
    lb, ub = certmin.sound_bounds(net, x, x, None, method)
    exact = (3 * Q(net[0].weight[0, 0].item()) + Q(net[1].weight[0, 1].item())) * Q(x.item())
    assert Q(lb.item()) <= exact <= Q(ub.item())


@settings(max_examples=examples(60), deadline=None)
@given(st.floats(0.1, 10), st.floats(0.1, 1), st.sampled_from(certmin.SOUND_METHODS))
def test_sound_bounds_charge_rounding_that_decides_an_intermediate_neuron(a, v, method):
    """As above, but the cancelling product, less its own float value, feeds a ReLU: in floats the neuron
    looks stable (z <= 0) about half the time when exactly it is not. Full CROWN bounds z with a backward
    pass of its own, whose rounding must be charged before the bounds decide the neuron; the output
    weight is large."""
    from fractions import Fraction as Q
    net = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1, bias=False)).double()
    x = torch.tensor([[v]], dtype=torch.float64)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[a], [1.0]], dtype=torch.float64))
        net[1].weight.copy_(torch.tensor([[3.0, -(3 * torch.tensor(a, dtype=torch.float64)).item()]]))
        net[1].bias.fill_(0)
        net[1].bias.fill_(-net[:2](x).item())
        net[3].weight.fill_(1e12)
    lb, ub = certmin.sound_bounds(net, x, x, None, method)
    z = (3 * Q(net[0].weight[0, 0].item()) + Q(net[1].weight[0, 1].item())) * Q(x.item()) + Q(net[1].bias.item())
    exact = max(z, Q(0)) * Q(net[3].weight.item())
    assert Q(lb.item()) <= exact <= Q(ub.item())


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(52, 60), st.floats(0.25, 1), st.permutations([0, 1, 2]), st.sampled_from(certmin.SOUND_METHODS),
       st.sampled_from(["linear", "conv"]))
def test_sound_bounds_charge_a_lost_sum_that_decides_an_intermediate_neuron(k, b, order, method, layout):
    """z = (2^k + b - 2^k) x - b / 2, with the three weight products summed inside full CROWN's backward
    pass for z (dense rows after Linear layers, patches after Conv2d ones): in floats b is lost in some
    summation orders, and z looks stable at -b / 2 when exactly it is b / 2. relu(z) must still be bounded."""
    from fractions import Fraction as Q
    w = torch.tensor([2.0 ** k, b, -2.0 ** k], dtype=torch.float64)[order]
    if layout == "linear":
        net = nn.Sequential(nn.Linear(1, 3, bias=False), nn.Linear(3, 1), nn.ReLU(), nn.Linear(1, 1, bias=False))
    else:
        net = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.Conv2d(3, 1, 1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(1, 1, bias=False))
    net = net.double()
    with torch.no_grad():
        net[0].weight.copy_(w.view_as(net[0].weight))
        net[1].weight.fill_(1)
        net[1].bias.fill_(-b / 2)
        net[-1].weight.fill_(1)
    x = torch.ones(1, *([1] if layout == "linear" else [1, 1, 1]), dtype=torch.float64)
    lb, ub = certmin.sound_bounds(net, x, x, None, method)
    assert Q(lb.item()) <= Q(b) / 2 <= Q(ub.item())


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(52, 60), st.floats(0.25, 1), st.permutations([0, 1, 2]), st.sampled_from(certmin.SOUND_METHODS))
def test_sound_bounds_charge_rounding_over_the_input_box(k, b, order, method):
    """A network with no arithmetic (Flatten) and a specification that sums 2^k, b and -2^k: in floats b
    is lost in some summation orders. Only the charge for the sum over the input box covers it."""
    from fractions import Fraction as Q
    x = torch.tensor([[2.0 ** k, b, -2.0 ** k]], dtype=torch.float64)[:, order]
    C = torch.ones(1, 1, 3, dtype=torch.float64)
    lb, ub = certmin.sound_bounds(nn.Sequential(nn.Flatten()), x, x, C, method)
    assert Q(lb.item()) <= Q(b) <= Q(ub.item())


@pytest.mark.parametrize("method", certmin.SOUND_METHODS)
def test_float32_bounds_are_not_bounds_in_exact_arithmetic_but_sound_bounds_are(method):
    """Why sound_bounds exists: at eps 0, float32 IBP's and CROWN-IBP's lower bound is the rounded
    forward pass, above the exact value about half the time. sound_bounds, from the same float32
    numbers, never is."""
    from fractions import Fraction as Q
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))
    x, y = torch.rand(8, 12), torch.randint(0, 10, (8,))
    C = certmin.margin_spec(y, 10)
    lb, _ = certmin.bounds(net, x, x, C, method)
    slb, sub = certmin.sound_bounds(net, x, x, C, method)
    above = 0
    for k in range(len(x)):
        lo, _ = exact_ibp(net, x[k], x[k], C[k])  # the exact margins at x
        above += sum(Q(a) > b for a, b in zip(lb[k].tolist(), lo))
    assert above > 0, "float32 bounds happened to be exact-sound on every row: the test lost its point"
    assert_encloses_exact(net, x, x, C, slb, sub)


@settings(max_examples=examples(40), deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([torch.float32, torch.float64]))
def test_sound_bounds_through_normalize_alone_encloses_the_exact_values(seed, dtype):
    """Normalize's two roundings are covered by the ulps outward alone (no affine layer's slack here)."""
    g = torch.Generator().manual_seed(seed)
    norm = certmin.Normalize(torch.rand(2, generator=g).tolist(), (0.1 + torch.rand(2, generator=g)).tolist())
    net = nn.Sequential(norm, nn.Flatten()).to(dtype)
    x = torch.rand(3, 2, 4, 4, generator=g).to(dtype)
    lb, ub = certmin.sound_bounds(net, x, x, dtype=dtype)
    assert_encloses_exact(net, x, x, None, lb, ub)


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)), min_size=1, max_size=40),
       st.sampled_from([torch.float32, torch.float64]))
# where -s l rounded to nearest is too low and decides t (rare; found by search): so that CI always has one
@example([(-224.665283203125, 951.8660278320312)], torch.float32)
@example([(-33.27659356205282, 0.029585553904129144)], torch.float64)
def test_sound_relax_upper_line_lies_above_relu_in_exact_arithmetic(pairs, dtype):
    """_sound_relax's upper line s z + t, with s and t the floats it returns, lies on or above relu at
    both ends of [l, u] in exact arithmetic (so on all of it: relu is convex), and its intercept is
    within a few ulps of max(-l, u) of the least that does (u - s u cancels); stable neurons get
    slopes 0 or 1 and t = 0 (exact).
    The chord's intercept -s l rounded to nearest lies below the exact one about half the time:
    without the rounding up this fails."""
    from fractions import Fraction as Q
    l = torch.tensor([min(a, b) for a, b in pairs], dtype=dtype)
    u = torch.tensor([max(a, b) for a, b in pairs], dtype=dtype)
    d_l, s, t = certmin._sound_relax(l, u)
    ulp, sub = torch.finfo(dtype).eps, torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # sub: the least subnormal
    for li, ui, dl, si, ti in zip(*(v.tolist() for v in (l, u, d_l, s, t))):
        L, U, S, T = Q(li), Q(ui), Q(si), Q(ti)
        assert S * L + T >= max(L, 0) and S * U + T >= max(U, 0), (li, ui, si, ti)
        if li < 0 < ui:
            assert dl in (0.0, 1.0) and 0 <= si <= 1  # 0: u / (u - l) underflowed
            need = max(-S * L, U - S * U)  # the least intercept that lies above both ends, with this slope
            assert T <= need + Q(4 * ulp) * max(-L, U) + 4 * Q(sub), (li, ui, si, ti)
        else:
            assert ti == 0 and dl == si == (1.0 if li >= 0 else 0.0)


@pytest.mark.parametrize("method", ["crown-ibp", "crown", "alpha-crown"])
def test_sound_bounds_in_chunks_of_examples_give_the_same_bounds_up_to_rounding(monkeypatch, method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 2 * 2, 10)).double()
    x, y = torch.rand(7, 1, 6, 6, dtype=torch.float64), torch.randint(0, 10, (7,))
    C, box = certmin.margin_spec(y, 10).double(), certmin.input_box(x, 0.05, outward=True)
    whole = certmin.sound_bounds(net, *box, C, method)
    monkeypatch.setattr(certmin, "SOUND_BUDGET", 1)  # one example at a time
    monkeypatch.setattr(certmin, "ALPHA_BUDGET", 1)
    for a, b in zip(whole, certmin.sound_bounds(net, *box, C, method)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_sound_bounds_refuses_arithmetic_narrower_than_the_weights_and_empty_boxes():
    net = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.rand(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype=torch.float64"):
        certmin.sound_bounds(net, x, x, dtype=torch.float32)
    with pytest.raises(ValueError, match="empty"):
        certmin.sound_bounds(net, x, x - 1)
    with pytest.raises(ValueError, match="crown-ibp"):
        certmin.sound_bounds(net, x, x, method="crown-ip")
    wide = nn.Sequential(nn.Linear(1, 2 * 10 ** 5), nn.ReLU(), nn.Linear(2 * 10 ** 5, 1))
    for method in certmin.SOUND_METHODS:  # float32 cannot bound the rounding of a sum of 200 000 terms
        with pytest.raises(ValueError, match="use float64"):
            certmin.sound_bounds(wide, torch.zeros(1, 1), torch.zeros(1, 1), method=method, dtype=torch.float32)


@settings(max_examples=examples(200), deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.sampled_from([torch.float32, torch.float64]))
def test_outward_input_box_contains_the_real_ball(v, eps, dtype):
    from fractions import Fraction as Q
    x = torch.tensor([v], dtype=dtype)
    xl, xu = certmin.input_box(x, eps, outward=True)
    xv = Q(x.item())
    assert Q(xl.item()) <= max(xv - Q(eps), 0) and Q(xu.item()) >= min(xv + Q(eps), 1)
    assert 0 <= xl.item() <= xu.item() <= 1


def test_outward_input_box_from_float64_pixels_contains_the_real_images_ball():
    from fractions import Fraction as Q
    k = torch.arange(256)
    for eps in (0.3, 2 / 255, 8 / 255, 1e-3):
        xl, xu = certmin.input_box(k.double() / 255, eps, outward=True, dtype=torch.float32)
        assert xl.dtype == torch.float32
        for j in range(256):
            assert Q(xl[j].item()) <= max(Q(j, 255) - Q(eps), 0) and Q(xu[j].item()) >= min(Q(j, 255) + Q(eps), 1)


@pytest.mark.parametrize("name,eps", [("kw_mnist.pth", 0.1), ("mnist_cnn_small.pth", 0.02),
                                      ("mnist_fc_3layer.pth", 0.02), ("cifar_2c2f.pth", 2 / 255)])
def test_sound_bounds_hold_in_exact_arithmetic_on_real_weights(name, eps):
    """IBP: contains IBP in rationals. CROWN-IBP: contains the rational outputs at a box corner, and at
    the image with eps 0 (where rounding is all that separates the bounds from the output)."""
    from fractions import Fraction as Q
    net = load_shared_model(name)
    torch.manual_seed(0)
    x, y = (torch.rand(1, 3, 32, 32), torch.randint(0, 10, (1,))) if name.startswith("cifar") else mnist_test(1)
    C = certmin.margin_spec(y, 10)
    xl, xu = certmin.input_box(x, eps, outward=True)
    assert_encloses_exact(net, xl, xu, C, *certmin.sound_bounds(net, xl, xu, C))
    lb, ub = certmin.sound_bounds(net, xl, xu, C, "crown-ibp")
    lb0, ub0 = certmin.sound_bounds(net, x, x, C, "crown-ibp")
    corner = torch.where(torch.rand(*x.shape[1:]) < 0.5, xl[0], xu[0])
    for p, lo, hi in [(x[0], lb0, ub0), (corner, lb, ub)]:
        out, _ = exact_ibp(net, p, p, C[0])
        assert all(Q(a) <= v <= Q(b) for a, b, v in zip(lo[0].tolist(), hi[0].tolist(), out))


# ----------------------------------------------------------------------------------------------
# Real weights and real data
# ----------------------------------------------------------------------------------------------


def load_shared_model(name):
    need_shared()
    path = SHARED / "models" / name
    assert path.exists(), f"missing {path}: the tests need ../shared beside the checkout"
    bench = pytest.importorskip("bench", reason="bench.py (which knows the shared networks' layers) is not beside "
                                "this file: certmin.py was copied alone")
    return bench.load_net(path)[0]


def mnist_test(n):
    import gzip
    import numpy as np
    need_shared()
    root = SHARED / "data" / "mnist"
    with gzip.open(root / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16)[:n * 784]
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return torch.tensor(x, dtype=torch.float32).view(n, 1, 28, 28) / 255, torch.tensor(y, dtype=torch.long)


@pytest.mark.parametrize("name,eps", [("kw_mnist.pth", 0.1), ("mnist_a_adv.pth", 0.02), ("mnist_cnn_small.pth", 0.01),
                                      ("mnist_fc_3layer.pth", 0.02), ("cifar_2c2f.pth", 2 / 255)])
def test_bounds_are_sound_on_real_weights(name, eps):
    torch.manual_seed(0)
    net = load_shared_model(name)
    if name.startswith("cifar"):
        x, y = torch.rand(3, 3, 32, 32), torch.randint(0, 10, (3,))
    else:
        x, y = mnist_test(3)
    C = certmin.margin_spec(y, 10)
    xl, xu = certmin.input_box(x, eps)
    for method in certmin.METHODS:
        lb, ub = certmin.bounds(net, xl, xu, C, method)
        assert_contains(net, xl, xu, C, lb, ub, TOL32)


@pytest.mark.parametrize("name,eps,n", [("kw_mnist.pth", 0.1, 24), ("mnist_a_adv.pth", 0.1, 40),
                                        ("mnist_cnn_small.pth", 0.02, 40), ("mnist_fc_3layer.pth", 0.02, 40),
                                        ("cifar_2c2f.pth", 1 / 255, 16)])
def test_crown_certifies_what_textbook_crown_does_and_alpha_crown_more(name, eps, n):
    """The savings (unstable rows, IBP intersected) and alpha-CROWN never lose a certificate of textbook
    CROWN on real weights: five networks trained by others (and, in test_scripts.py, one by train.py)."""
    torch.manual_seed(0)
    x, y = (torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,))) if name.startswith("cifar") else mnist_test(n)
    crown_keeps_textbook_certificates(load_shared_model(name), x, y, eps, some=name != "cifar_2c2f.pth")


def crown_keeps_textbook_certificates(net, x, y, eps, some=True):
    C, box = certmin.margin_spec(y, 10), certmin.input_box(x, eps)
    with torch.no_grad():
        textbook = (textbook_crown(net, *box, C) > 0).all(1)
        crown = (certmin.bounds(net, *box, C, "crown")[0] > 0).all(1)
        alpha = (certmin.bounds(net, *box, C, "alpha-crown", alpha_steps=10)[0] > 0).all(1)
    assert not (textbook & ~crown).any() and not (crown & ~alpha).any()
    assert textbook.any() or not some


def test_certified_examples_are_never_misclassified_by_pgd():
    torch.manual_seed(0)
    net = load_shared_model("kw_mnist.pth")
    x, y = mnist_test(64)
    eps = 0.1
    C = certmin.margin_spec(y, 10)
    box = certmin.input_box(x, eps)
    certified = torch.zeros(len(y), dtype=torch.bool)
    with torch.no_grad():
        for method in certmin.METHODS:  # CROWN verifies ~95% of this model at eps 0.1, IBP none
            certified |= (certmin.bounds(net, *box, C, method)[0] > 0).all(1)
    assert certified.float().mean() > 0.5, "this certified-trained model should verify most examples"
    x_adv = certmin.pgd(net, x, y, eps, steps=40, step_size=eps / 8, restarts=2)
    attacked = net(x_adv).argmax(1) != y
    assert attacked.any(), "PGD should break some uncertified examples"
    assert not (certified & attacked).any()


# ----------------------------------------------------------------------------------------------
# BatchNorm: a per-channel affine map in every bound, with the clean batch's statistics in training
# ----------------------------------------------------------------------------------------------


def stats_net(net, x, training):
    """(the function the bounds describe, stats): in training mode the network with x's batch statistics."""
    if not training:
        return net, None
    net.train()
    stats = certmin.batch_stats(net, x)
    return (lambda z: certmin.forward(net, z, stats)), stats


@PROP
@given(networks(bn=True), st.floats(0, 0.5), st.sampled_from(certmin.METHODS), st.booleans(), st.booleans())
def test_bounds_with_batchnorm_are_sound(case, eps, method, with_C, training):
    """Sampled and attacked points inside every method's bounds, BatchNorm in eval mode (running statistics)
    or in training mode (the clean batch's statistics, which the points then share)."""
    net, x, y, classes = case
    f, stats = stats_net(net, x, training)
    C = certmin.margin_spec(y, classes).double() if with_C else None
    xl, xu = certmin.input_box(x, eps)
    lb, ub = certmin.bounds(net, xl, xu, C, method, stats=stats)
    assert_contains(f, xl, xu, C, lb, ub, TOL64)


@settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(bn=True), st.floats(0, 0.3), st.sampled_from(certmin.SOUND_METHODS))
def test_sound_bounds_with_batchnorm_are_the_methods_within_rounding(case, eps, method):
    net, x, y, classes = case
    C = certmin.margin_spec(y, classes).double()
    xl, xu = certmin.input_box(x, eps)
    lb, ub = certmin.bounds(net, xl, xu, C, method)
    slb, sub = certmin.sound_bounds(net, xl, xu, C, method)
    scale = 1 + max(lb.abs().max().item(), ub.abs().max().item())
    assert (lb - slb).max().item() <= 1e-9 * scale and (sub - ub).max().item() <= 1e-9 * scale
    if method in ("ibp", "crown-ibp"):
        assert (slb <= lb).all() and (sub >= ub).all()


@pytest.mark.parametrize("method", certmin.SOUND_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sound_bounds_charge_the_rounding_of_a_batchnorm_shift(method, dtype):
    """x = 0 exactly, BatchNorm with var + eps = 3 (sqrt(3) irrational), mean M = 2^20 and bias b = M s' (s'
    the float scale): in floats the shift b - M s' is 0, in exact arithmetic b - M / sqrt(3) is not (about
    M u). Nothing else is charged here, so sound_bounds must account for the scale's rounding itself."""
    from fractions import Fraction as Q
    M = 2.0 ** 20
    bn = nn.BatchNorm1d(1, eps=0.0).to(dtype).eval()
    with torch.no_grad():
        bn.running_var.fill_(3.0)
        bn.running_mean.fill_(M)
        bn.weight.fill_(1.0)
        bn.bias.copy_(M * (1 / torch.sqrt(torch.tensor([3.0], dtype=torch.float64))))  # exact in float64: M is 2^20
    net = nn.Sequential(nn.Flatten(), bn, nn.Linear(1, 1)).to(dtype)
    with torch.no_grad():
        net[2].weight.fill_(1.0)
        net[2].bias.zero_()
    x = torch.zeros(1, 1, 1, 1, dtype=dtype)
    lb, ub = certmin.sound_bounds(net, x, x, None, method)
    b, lo, hi = Q(bn.bias.item()), Q(lb.item()), Q(ub.item())
    # lo <= b - M / sqrt(3) <= hi, decided in rationals
    assert b - lo > 0 and 3 * (b - lo) ** 2 >= Q(M) ** 2, "the lower bound exceeds the exact output"
    assert b - hi < 0 or 3 * (b - hi) ** 2 <= Q(M) ** 2, "the upper bound is below the exact output"
    assert ub.item() - lb.item() < 1e-3  # room of the order of M u, not more


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
@pytest.mark.parametrize("sound", [False, True])
def test_crown_patches_through_batchnorm_equal_the_dense_rows(seed, method, sound):
    """Full CROWN keeps a conv neuron's row as a patch also when a BatchNorm lies between the convolution
    and the ReLU (the row starts one-hot over the BatchNorm's output): the same bounds as dense rows over
    the whole layer, up to float64 rounding (and, for sound_bounds, its charges). Three conv-BatchNorm-ReLU
    blocks (strides, padding, groups), so that the second and third ReLUs take the patch path."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1, groups=2),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 2), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(12, 3)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.1)
    x, y = torch.rand(2, 2, 6, 6, generator=g, dtype=torch.float64), torch.tensor([0, 2])
    C = certmin.margin_spec(y, 3).double()
    box = certmin.input_box(x, 0.05)
    layers = certmin._layers(net)
    shapes = certmin._ibp(layers, *box, record=True)[3]
    assert all(certmin._patch_elements(layers, i, shapes) is not None for i in (5, 8))
    run = certmin.sound_bounds if sound else certmin.bounds
    lb, ub = run(net, *box, C, method)
    real = certmin._patch_elements
    try:
        certmin._patch_elements = lambda *a: None
        dlb, dub = run(net, *box, C, method)
    finally:
        certmin._patch_elements = real
    scale = 1 + max(lb.abs().max().item(), ub.abs().max().item())
    assert torch.allclose(lb, dlb, atol=1e-9 * scale) and torch.allclose(ub, dub, atol=1e-9 * scale)
    assert (certmin.bounds(net, *box, C, "crown-ibp")[0] <= lb + 1e-9 * scale).all()  # CROWN's boxes did tighten


def test_batch_stats_are_training_mode_batchnorm():
    """batch_stats' map equals torch's training-mode BatchNorm on the clean batch (outputs and running
    statistics after the step); forward(stats=) then updates nothing; the gradient flows through the
    statistics as torch's does."""
    torch.manual_seed(0)
    net = certmin.dm_small(side=12, bn=True).double().train()
    ref = copy.deepcopy(net)
    x = torch.rand(6, 1, 12, 12, dtype=torch.float64)
    stats = certmin.batch_stats(net, x)
    assert len(stats) == 3
    out = certmin.forward(net, x, stats)
    expected = ref(x)
    assert torch.allclose(out, expected, atol=1e-10)
    for a, b in zip(net.buffers(), ref.buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-12)
    before = [b.clone() for b in net.buffers()]
    certmin.forward(net, torch.rand_like(x), stats)
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))
    g, = torch.autograd.grad(out.sum(), net[0].weight)
    g_ref, = torch.autograd.grad(expected.sum(), ref[0].weight)
    assert torch.allclose(g, g_ref, atol=1e-8)
    assert certmin.batch_stats(certmin.dm_small(side=12), x) == {}


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_batch_stats_running_statistics_over_several_batches(momentum):
    """Three batches through batch_stats and through torch's training-mode BatchNorm: the same running
    statistics and counts, for an exponential (momentum) and a cumulative (None) average, 2-D and 1-D."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(), nn.Flatten(),
                        nn.Linear(48, 5), nn.BatchNorm1d(5, momentum=momentum), nn.ReLU(), nn.Linear(5, 2)).double()
    ref = copy.deepcopy(net)
    for _ in range(3):
        x = torch.rand(7, 1, 6, 6, dtype=torch.float64)
        certmin.batch_stats(net, x)
        ref(x)
    for (name, a), b in zip(net.named_buffers(), ref.buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-12), name


def test_bn_eval_and_the_training_mode_refusals():
    net = certmin.dm_small(side=12, bn=True).train()
    net[1].eval()
    with certmin.bn_eval(net):
        assert not any(m.training for m in net if isinstance(m, nn.BatchNorm2d))
    assert [m.training for m in net if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))] == [False, True, True]
    x = torch.rand(2, 1, 12, 12)
    box = certmin.input_box(x, 0.1)
    with pytest.raises(ValueError, match="batch_stats"):
        certmin.bounds(net, *box)
    with pytest.raises(ValueError, match="model.eval"):
        certmin.sound_bounds(net.double(), *(t.double() for t in box))
    flat = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(4, 2)).eval()
    with pytest.raises(TypeError, match="BatchNorm1d over"):
        certmin.bounds(flat, torch.zeros(1, 3, 4), torch.ones(1, 3, 4))


@settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(bn=True), st.floats(0, 0.3), st.sampled_from(certmin.METHODS))
def test_folded_batchnorm_is_the_same_network_and_the_same_bounds(case, eps, method):
    """fold_bn's copy computes the same function, and (a BatchNorm after an affine layer composes with it
    into one affine layer, in the reals) every method gives it the same bounds, up to float64 rounding."""
    net, x, y, classes = case
    folded = certmin.fold_bn(net)
    bns = sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in net)
    assert len(folded) == len(net) - bns and not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded)
    pts = torch.rand(5, *x.shape[1:], dtype=x.dtype)
    with torch.no_grad():
        assert torch.allclose(folded(pts), net(pts), atol=1e-9 * (1 + net(pts).abs().max().item()))
    C = certmin.margin_spec(y, classes).double()
    box = certmin.input_box(x, eps)
    lb, ub = certmin.bounds(net, *box, C, method)
    flb, fub = certmin.bounds(folded, *box, C, method)
    scale = 1 + max(lb.abs().max().item(), ub.abs().max().item())
    assert torch.allclose(lb, flb, atol=1e-8 * scale) and torch.allclose(ub, fub, atol=1e-8 * scale)


def test_ibp_init_draws_the_weights_from_its_normal_and_keeps_the_last():
    torch.manual_seed(0)
    net = certmin.cnn7(in_ch=3, side=32)
    last = net[-1].weight.clone()
    certmin.ibp_init(net)
    affine = [m for m in net if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(affine) == 7 and torch.equal(affine[-1].weight, last)
    for m in affine[:-1]:
        fan_in = m.weight[0].numel()
        sigma = math.sqrt(2 * math.pi) / fan_in
        w = m.weight.detach().double()
        assert abs(w.mean().item()) < 4 * sigma / math.sqrt(w.numel())
        assert abs(w.std().item() / sigma - 1) < 0.05  # >= 1728 draws per layer: 5% is over 2 standard errors
        assert abs(w.abs().mean().item() * fan_in - 2) < 0.1  # the growth per layer that the ReLU halves


def test_cnn7_is_dm_large_with_batchnorm_before_every_relu():
    net = certmin.cnn7(in_ch=3, side=32, mean=[0.5] * 3, std=[0.25] * 3)
    kinds = [type(m).__name__ for m in net]
    relus = [i for i, k in enumerate(kinds) if k == "ReLU"]
    assert len(relus) == 6 and all(kinds[i - 1].startswith("BatchNorm") for i in relus)
    plain = [k for k in kinds if not k.startswith("BatchNorm")]
    assert plain == [type(m).__name__ for m in certmin.dm_large(in_ch=3, side=32, mean=[0.5] * 3, std=[0.25] * 3)]
    assert net.train()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_warmup_loss_against_a_direct_computation():
    """Two ReLU layers written out by hand: the tightness and balance terms, a layer with one kind of
    neuron missing (balance term 2), a layer with neither (adds nothing), and the input radius after Normalize."""
    tau = 0.5
    l1, u1 = torch.tensor([[1.0, -3.0, -1.0, 2.0]]), torch.tensor([[3.0, -1.0, 1.0, 4.0]])  # active 0, 3; inactive 1
    l2, u2 = torch.tensor([[0.5, 1.0]]), torch.tensor([[1.5, 2.0]])                          # all active
    l3, u3 = torch.tensor([[-1.0]]), torch.tensor([[1.0]])                                    # neither
    xl, xu = torch.zeros(1, 1, 1, 2), torch.full((1, 1, 1, 2), 0.4)                           # radius 0.2
    net = nn.Sequential(certmin.Normalize([0.0], [0.5]), nn.Flatten(), nn.Linear(2, 2))       # radius 0.4 after it
    tight, relu = certmin.warmup_loss({1: (l1, u1), 3: (l2, u2), 5: (l3, u3)}, xl, xu, tau, model=net)
    d0 = 0.4
    radii = [1.0, 0.5, 1.0]  # mean radius per layer
    want_tight = sum(max(0.0, tau - d0 / d) / tau for d in radii) / 3
    c1 = [2.0, -2.0, 0.0, 3.0]
    mean1 = sum(c1) / 4
    r_mean = (2.0 + 3.0) / 2.0
    r_var = ((2 - mean1) ** 2 + (3 - mean1) ** 2) / (-2 - mean1) ** 2
    fold = lambda r: min(r, 1 / r)  # noqa: E731
    want_relu = ((max(0, tau - fold(r_mean)) + max(0, tau - fold(r_var))) / tau + 2.0 + 0.0) / 3
    assert tight.item() == pytest.approx(want_tight, rel=1e-6)
    assert relu.item() == pytest.approx(want_relu, rel=1e-6)
    l1.requires_grad_(True)
    t, r = certmin.warmup_loss({1: (l1, u1), 5: (l3, u3)}, xl, xu, tau)
    g, = torch.autograd.grad(t + r, l1)
    assert g.isfinite().all()


# ----------------------------------------------------------------------------------------------
# Attacks and FOSC
# ----------------------------------------------------------------------------------------------


def small_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("attack", ["fgsm_rs", "pgd"])
@pytest.mark.parametrize("training", [True, False])
def test_attacks_stay_in_the_box_and_leave_the_model_as_found(attack, training):
    net = small_net().train(training)
    net[1].weight.requires_grad_(False)
    x, y = torch.rand(32, 1, 3, 4), torch.randint(0, 4, (32,))
    eps = 0.2
    with torch.no_grad():  # attacks must work inside a caller's no_grad too
        x_adv = getattr(certmin, attack)(net, x, y, eps) if attack == "fgsm_rs" else certmin.pgd(net, x, y, eps, steps=10)
    xl, xu = certmin.input_box(x, eps)
    assert (x_adv >= xl).all() and (x_adv <= xu).all() and (x_adv - x).abs().max() <= eps + 1e-7
    assert net.training == training
    assert not net[1].weight.requires_grad and net[1].bias.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_pgd_keeps_the_strongest_point():
    net = small_net()
    x, y = torch.rand(64, 1, 3, 4), torch.randint(0, 4, (64,))
    eps = 0.3
    x_adv = certmin.pgd(net, x, y, eps, steps=30, step_size=eps / 4, restarts=2)
    loss_adv = F.cross_entropy(net(x_adv), y, reduction="none")
    loss_clean = F.cross_entropy(net(x), y, reduction="none")
    wrong_adv = net(x_adv).argmax(1) != y
    assert (wrong_adv | (loss_adv >= loss_clean - 1e-6)).all()
    assert wrong_adv.float().mean() > (net(x).argmax(1) != y).float().mean()
    fgsm = certmin.fgsm_rs(net, x, y, eps)
    assert F.cross_entropy(net(x_adv), y) > F.cross_entropy(net(fgsm), y)


def _pgd_masked(model, x, y, eps, steps, step_size, restarts):
    """pgd's bookkeeping before it went sync-free (masked assignment): the frozen reference."""
    xl, xu = certmin.input_box(x, eps)
    best, best_loss = x.clone(), torch.full_like(y, -math.inf, dtype=x.dtype)
    best_wrong = torch.zeros_like(y, dtype=torch.bool)
    for _ in range(restarts):
        xa = xl + (xu - xl) * torch.rand_like(x)
        for k in range(steps + 1):
            loss, logits, g = certmin._input_grad(model, xa, y)
            wrong = logits.argmax(1) != y
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best[better], best_loss[better], best_wrong[better] = xa[better], loss[better], wrong[better]
            if k < steps:
                xa = torch.min(torch.max(xa + step_size * g.sign(), xl), xu)
    return best


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pgd_without_host_syncs_returns_the_masked_versions_points(dtype):
    net = small_net().to(dtype)
    x, y = torch.rand(64, 1, 3, 4, dtype=dtype), torch.randint(0, 4, (64,))
    torch.manual_seed(5)
    ours = certmin.pgd(net, x, y, 0.3, steps=15, step_size=0.05, restarts=3)
    torch.manual_seed(5)
    ref = _pgd_masked(net, x, y, 0.3, 15, 0.05, 3)
    assert torch.equal(ours, ref)
    assert not torch.equal(ref, x)  # the attack moved


def test_fosc_matches_its_closed_form_and_is_per_example():
    net = small_net()
    x = 0.25 + 0.5 * torch.rand(8, 1, 3, 4)  # away from [0, 1]: no clipping
    y = torch.randint(0, 4, (8,))
    eps = 0.1
    x_adv = certmin.fgsm_rs(net, x, y, eps)
    x_adv.requires_grad_(True)
    c = certmin.fosc(net, x_adv, x, y, eps)
    for i in range(8):
        g, = torch.autograd.grad(F.cross_entropy(net(x_adv[i:i + 1]), y[i:i + 1]), x_adv)
        g = g[i]
        closed = eps * g.abs().sum() - ((x_adv[i] - x[i]) * g).sum()
        assert torch.allclose(c[i], closed, atol=1e-6)
    assert (c >= 0).all()
    loss, mean, _ = certmin.adv_loss_and_fosc(net, x_adv, x, y, eps)
    assert math.isclose(mean, c.mean().item(), rel_tol=1e-5)
    # at a corner that maximises a linear loss, FOSC is 0
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    xs, ys = 0.5 * torch.ones(1, 1, 3, 4), torch.tensor([0])
    best = certmin.pgd(lin, xs, ys, 0.1, steps=20, step_size=0.05)
    assert certmin.fosc(lin, best, xs, ys, 0.1).abs().item() < 1e-6


def test_one_backward_for_fosc_and_the_adversarial_gradient_gives_the_same_step():
    """adv_loss_and_fosc(params=) + TwoGradient.step(grad_adv=) must be the two-pass step: the same
    parameter gradient (bit for bit), the same FOSC up to rounding, the same combined gradient."""
    torch.manual_seed(3)
    net = small_net()
    x, y = 0.25 + 0.5 * torch.rand(8, 1, 3, 4), torch.randint(0, 4, (8,))
    x_adv = certmin.fgsm_rs(net, x, y, 0.1)
    params = list(net.parameters())
    loss, fosc, wrong = certmin.adv_loss_and_fosc(net, x_adv, x, y, 0.1)
    loss1, fosc1, wrong1, grads = certmin.adv_loss_and_fosc(net, x_adv, x, y, 0.1, params=params)
    assert torch.equal(loss.detach(), loss1) and torch.equal(wrong, wrong1) and not loss1.requires_grad
    assert torch.allclose(fosc, fosc1, rtol=1e-6, atol=0)
    for g, g1 in zip(torch.autograd.grad(loss, params, retain_graph=True), grads):
        assert torch.equal(g, g1)
    combined = []
    for two_pass in (True, False):
        tg = certmin.TwoGradient(params)
        loss_ver, _ = certmin.verified_loss(net, x, y, 0.05)
        tg.step(loss if two_pass else loss1, loss_ver, fosc=fosc, c_t=0.01, final=False,
                grad_adv=None if two_pass else grads)
        combined.append([p.grad.clone() for p in params])
    for a, b in zip(*combined):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Schedules and models
# ----------------------------------------------------------------------------------------------


def test_smooth_ramp_is_continuous_with_a_continuous_slope():
    f = lambda t: certmin.smooth_ramp(t, 10, 40, 0.4)  # noqa: E731
    assert f(0) == 0 and f(10) == 0 and f(50) == 0.4 and f(100) == 0.4
    h = 1e-6
    for t in [10, 20, 30, 49.999]:  # 20 is the joint at start + length/4
        assert abs(f(t + h) - f(t - h)) < 1e-5
        assert abs((f(t + 2 * h) - f(t + h)) - (f(t - h) - f(t - 2 * h))) / h < 1e-4
    ts = [10 + 0.1 * i for i in range(401)]
    assert all(f(a) <= f(b) for a, b in zip(ts, ts[1:]))
    assert f(20) == pytest.approx(0.4 / 13)
    assert certmin.linear_ramp(30, 10, 40, 0.0, init=1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("build,params", [(certmin.dm_small, None), (certmin.dm_medium, None), (certmin.dm_large, None)])
def test_models_shapes(build, params):
    for ch, side in [(1, 28), (3, 32)]:
        net = build(in_ch=ch, side=side, mean=[0.5] * ch, std=[0.25] * ch)
        assert isinstance(net[0], certmin.Normalize)
        assert net(torch.rand(2, ch, side, side)).shape == (2, 10)
    with pytest.raises(ValueError, match="std > 0"):
        certmin.Normalize([0.5], [0.0])


# ----------------------------------------------------------------------------------------------
# The two-gradient rule
# ----------------------------------------------------------------------------------------------


def two_losses(g_a, g_b, theta=None):
    """A parameter theta and two linear losses with the given gradients (values <theta, g>)."""
    theta = torch.zeros(len(g_a), dtype=torch.float64, requires_grad=True) if theta is None else theta
    return theta, (theta * g_a).sum(), (theta * g_b).sum()


def cos(a, b):
    return (torch.dot(a, b) / (a.norm() * b.norm())).item()


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=4, max_size=4), st.lists(st.floats(-5, 5), min_size=4, max_size=4),
       st.floats(0, 1), st.floats(0, 1))
def test_two_gradient_geometry(a, b, fosc, c_t):
    g_a, g_b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if g_a.norm() < 1e-3 or g_b.norm() < 1e-3:
        return
    theta, la, lb = two_losses(g_a, g_b)
    k = certmin.TwoGradient([theta]).step(la, lb, fosc=fosc, c_t=c_t)
    g = theta.grad
    assert torch.allclose(g, k["k_adv"] * g_a + k["k_ver"] * g_b)
    if torch.dot(g_a, g_b) > 0:
        assert not k["conflict"] and math.isclose(cos(g, g_a), cos(g, g_b), abs_tol=1e-9)
    else:
        assert k["conflict"]
        other = g_b if fosc <= c_t else g_a  # the gradient without priority
        assert abs(torch.dot(g, other).item()) <= 1e-9 * (1 + g.norm().item() * other.norm().item())
        # the prioritised weight is 1, the other projects: -d / n^2. (Not "k_adv == 1 iff FOSC <= c_t":
        # for g_b = -g_a the projection weight is exactly 1 too; hypothesis found that case once.)
        d = torch.dot(g_a, g_b).item()
        first, second, n = ("k_adv", "k_ver", g_b.norm().item()) if fosc <= c_t else ("k_ver", "k_adv", g_a.norm().item())
        assert k[first] == 1.0 and math.isclose(k[second], -d / n ** 2, rel_tol=1e-12, abs_tol=1e-15)


def test_two_gradient_geometry_with_opposite_gradients_of_equal_norm():
    """The case that made test_two_gradient_geometry fail once: both weights 1, the combination 0."""
    test_two_gradient_geometry.hypothesis.inner_test([1.0, 0, 0, 0], [-1.0, 0, 0, 0], 1.0, 0.0)
    theta, la, lb = two_losses(torch.tensor([1.0, 0, 0, 0], dtype=torch.float64),
                               torch.tensor([-1.0, 0, 0, 0], dtype=torch.float64))
    k = certmin.TwoGradient([theta]).step(la, lb, fosc=1.0, c_t=0.0)
    assert (k["k_adv"], k["k_ver"], k["conflict"]) == (1.0, 1.0, True) and not theta.grad.any()


def test_two_gradient_final_weights_ignore_the_current_step():
    torch.manual_seed(0)
    history = [(torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)) for _ in range(4)]
    results = []
    for current in [(torch.randn(5), torch.randn(5)), (torch.randn(5) * 9, -torch.randn(5))]:
        tg = certmin.TwoGradient([torch.zeros(5, dtype=torch.float64, requires_grad=True)])
        for g_a, g_b in history:
            theta, la, lb = two_losses(g_a, g_b, tg.params[0])
            tg.step(la, lb, final=True)
        theta, la, lb = two_losses(current[0].double(), current[1].double(), tg.params[0])
        k = tg.step(la, lb, fosc=0.3, c_t=0.1, final=True)
        results.append([k[key].item() for key in ("k_adv", "k_ver", "k_reg", "conflict")])
    assert results[0] == results[1]


class SyncTwoGradient(certmin.TwoGradient):
    """The two-gradient rule as it was before it moved onto the device: Python floats and
    .item() everywhere, a branch per case. Kept as a frozen reference for the sync-free version."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.n_a = self.n_b = 0.0

    def _grads(self, loss_adv, loss_ver, fosc):
        g_a = torch.autograd.grad(loss_adv, self.params, retain_graph=True, allow_unused=True)
        g_b = torch.autograd.grad(loss_ver, self.params, allow_unused=True)
        flat = [torch.zeros_like(p) if g is None else g for g, p in zip(g_a + g_b, self.params * 2)]
        scalars = torch.tensor([float(loss_ver.detach()), float(fosc)], dtype=flat[0].dtype, device=flat[0].device)
        vec = torch.cat([g.reshape(-1) for g in flat] + [scalars])
        if self.group is not None:
            import torch.distributed as dist
            dist.all_reduce(vec, group=self.group)
            vec /= dist.get_world_size(self.group)
        n = (len(vec) - 2) // 2
        return vec[:n], vec[n:2 * n], vec[-2].item(), vec[-1].item()

    def _update(self, g_a, g_b):
        '''Fold one pair of gradients into the moving averages (Adam-style bias correction on read).'''
        bg, bn = self.beta_grad, self.beta_norm
        if self.count == 0:
            self.m_a, self.m_b = torch.zeros_like(g_a), torch.zeros_like(g_b)
            self.n_a = self.n_b = 0.0
        self.count += 1
        self.m_a, self.m_b = bg * self.m_a + (1 - bg) * g_a, bg * self.m_b + (1 - bg) * g_b
        self.n_a = bn * self.n_a + (1 - bn) * g_a.norm().item()
        self.n_b = bn * self.n_b + (1 - bn) * g_b.norm().item()

    def _averages(self):
        cg, cn = 1 - self.beta_grad ** self.count, 1 - self.beta_norm ** self.count
        return self.m_a / cg, self.m_b / cg, self.n_a / cn, self.n_b / cn

    def weights(self, m_a, m_b, n_a, n_b, fosc, c_t, final):
        '''(k_adv, k_ver, k_reg, conflict) from (averaged) gradients m and norms n.'''
        d = torch.dot(m_a, m_b).item()
        if self.mode == "sum":
            return 1.0, 1.0, 0.0, d <= 0
        if self.mode == "mgda":  # closed-form min-norm point of the segment [m_b, m_a]
            diff = (m_a - m_b).pow(2).sum().item()
            alpha = 0.5 if diff == 0 else min(max(torch.dot(m_b - m_a, m_b).item() / diff, 0.0), 1.0)
            return alpha, 1 - alpha, 0.0, d <= 0
        if d > 0:  # no conflict: follow the bisector of the two normalised gradients
            b = m_a / n_a + m_b / n_b
            gamma = (n_a + n_b + d / n_a + d / n_b) / (2 * b.pow(2).sum().item())
            if final:  # the authors' after-ramp scaling: same direction
                return gamma, gamma * n_a / n_b, 0.0, False
            return gamma / n_a, gamma / n_b, 0.0, False
        k_reg = 0.5 if final else 0.0
        if fosc <= c_t:  # attack converged: the adversarial gradient has priority
            return 1.0, (-d / n_b ** 2 if n_b > 0 else 0.0), k_reg, True
        return (-d / n_a ** 2 if n_a > 0 else 0.0), 1.0, k_reg, True

    def step(self, loss_adv, loss_ver, fosc=0.0, c_t=0.0, final=False):
        '''Compute both gradients, weight them, write k_adv g_adv + (k_ver + 2 k_reg L_ver) g_ver into
        p.grad (the caller then calls optimizer.step()). Returns the weights and the conflict flag.'''
        g_a, g_b, l_ver, fosc = self._grads(loss_adv, loss_ver, fosc)
        if final and not self.was_final:  # restart the averages at the first step with the final eps
            self.count, self.pending = 0, None
        self.was_final = self.was_final or final
        if not final or self.mode in ("advibp-biased", "sum"):
            m_a, m_b, n_a, n_b = g_a, g_b, g_a.norm().item(), g_b.norm().item()
        else:
            if self.count == 0:  # no past yet: take the current gradients
                self._update(g_a, g_b)
            else:  # the averages hold previous steps only; the current pair waits for the next step
                if self.pending is not None:
                    self._update(*self.pending)
                self.pending = (g_a, g_b)
            m_a, m_b, n_a, n_b = self._averages()
        k_adv, k_ver, k_reg, conflict = self.weights(m_a, m_b, n_a, n_b, fosc, c_t, final)
        combined = k_adv * g_a + (k_ver + 2 * k_reg * l_ver) * g_b
        offset = 0
        for p in self.params:
            p.grad = combined[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return {"k_adv": k_adv, "k_ver": k_ver, "k_reg": k_reg, "conflict": bool(conflict),
                "g_adv_norm": g_a.norm(), "g_ver_norm": g_b.norm()}


@pytest.mark.parametrize("mode", certmin.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sync_free_two_gradient_gives_the_same_weights_as_the_synchronous_rule(mode, dtype):
    """A few Adam steps of each phase (eps ramp with current-batch weights, the restart at the final
    eps, bias-corrected weights with both priorities): bit-identical weights and parameters."""
    runs = []
    for rule in (SyncTwoGradient, certmin.TwoGradient):
        torch.manual_seed(11)
        net = small_net().to(dtype)
        x, y = torch.rand(16, 1, 3, 4, dtype=dtype), torch.randint(0, 4, (16,))
        opt, tg = torch.optim.Adam(net.parameters(), lr=1e-2), rule(net.parameters(), mode=mode)
        weights = []
        for step in range(10):
            y_adv = (y + step // 2) % 4  # labels that change every other step: gradients that conflict at times
            x_adv = certmin.fgsm_rs(net, x, y_adv, 0.1)
            loss_adv, fosc, _ = certmin.adv_loss_and_fosc(net, x_adv, x, y_adv, 0.1)
            loss_ver, _ = certmin.verified_loss(net, x, y, 0.02 * step, beta=0.5)
            opt.zero_grad()
            k = tg.step(loss_adv, loss_ver, fosc=float(fosc) if rule is SyncTwoGradient else fosc,
                        c_t=[1.0, 0.0][step % 2], final=step >= 4)
            weights.append([float(k[key]) for key in ("k_adv", "k_ver", "k_reg", "conflict")])
            opt.step()
        runs.append((weights, [p.detach().clone() for p in net.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert len({w[3] for w in runs[0][0]}) == 2 or mode != "advibp"  # both branches were taken


@pytest.mark.parametrize("mode", certmin.MODES)
def test_two_gradient_writes_the_combined_gradient(mode):
    torch.manual_seed(4)
    net = small_net().double()
    x, y = torch.rand(16, 1, 3, 4, dtype=torch.float64), torch.randint(0, 4, (16,))
    tg = certmin.TwoGradient(net.parameters(), mode=mode)
    for step in range(4):
        loss_adv = F.cross_entropy(net(certmin.fgsm_rs(net, x, y, 0.1)), y)
        loss_ver, _ = certmin.verified_loss(net, x, y, 0.1)
        g_a = torch.autograd.grad(loss_adv, list(net.parameters()), retain_graph=True)
        g_b = torch.autograd.grad(loss_ver, list(net.parameters()), retain_graph=True)
        k = tg.step(loss_adv, loss_ver, fosc=0.0, c_t=1.0, final=step >= 1)
        for p, a, b in zip(net.parameters(), g_a, g_b):
            expect = k["k_adv"] * a + (k["k_ver"] + 2 * k["k_reg"] * loss_ver.item()) * b
            assert torch.allclose(p.grad, expect, atol=1e-12)
        if mode == "sum":
            assert (k["k_adv"], k["k_ver"], k["k_reg"]) == (1, 1, 0)
        if mode == "mgda":
            assert k["k_reg"] == 0 and 0 <= k["k_adv"] <= 1 and math.isclose(k["k_adv"] + k["k_ver"], 1)


@pytest.mark.parametrize("mode", ["advibp", "advibp-biased"])
def test_first_tensor_scope_weights_from_the_first_gradient_and_updates_all(mode):
    """scope="first": the weights are those of the rule run on the first tensor alone (the authors' code);
    every parameter's gradient is then combined with them."""
    torch.manual_seed(5)
    net = small_net().double()
    x, y = torch.rand(16, 1, 3, 4, dtype=torch.float64), torch.randint(0, 4, (16,))
    params = list(net.parameters())
    tg = certmin.TwoGradient(params, mode=mode, scope="first")
    ref = certmin.TwoGradient(params[:1], mode=mode)
    full = certmin.TwoGradient(params, mode=mode)
    differs = False

    def losses(step):
        torch.manual_seed(step)
        loss_adv = F.cross_entropy(net(certmin.fgsm_rs(net, x + 0.01 * step, y, 0.1)), y)
        return loss_adv, certmin.verified_loss(net, x, y, 0.1)[0]

    for step in range(5):
        kf = full.step(*losses(step), fosc=1.0, c_t=0.0, final=step >= 2)
        kr = ref.step(*losses(step), fosc=1.0, c_t=0.0, final=step >= 2)
        loss_adv, loss_ver = losses(step)
        g_a = torch.autograd.grad(loss_adv, params, retain_graph=True)
        g_b = torch.autograd.grad(loss_ver, params, retain_graph=True)
        k = tg.step(loss_adv, loss_ver, fosc=1.0, c_t=0.0, final=step >= 2)
        for key in ("k_adv", "k_ver", "k_reg"):
            assert torch.allclose(k[key], kr[key], rtol=1e-12, atol=0), key
        differs = differs or not torch.allclose(k["k_adv"], kf["k_adv"])
        for p, a, b in zip(params, g_a, g_b):
            expect = k["k_adv"] * a + (k["k_ver"] + 2 * k["k_reg"] * loss_ver.item()) * b
            assert torch.allclose(p.grad, expect, atol=1e-12)
    assert differs  # the scope changes the weights: the test can tell them apart
    state = tg.state_dict()
    with pytest.raises(ValueError, match="scope"):
        certmin.TwoGradient(params, mode=mode).load_state_dict(state)
    with pytest.raises(ValueError, match="gradient scope"):
        certmin.TwoGradient(params, scope="second")


def test_mgda_is_the_min_norm_point():
    g_a, g_b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    theta, la, lb = two_losses(g_a, g_b)
    k = certmin.TwoGradient([theta], mode="mgda").step(la, lb)
    assert math.isclose(k["k_adv"], 0.8)  # argmin |a g_a + (1-a) g_b|: a = 4/5
    theta, la, lb = two_losses(g_a, g_a)
    assert certmin.TwoGradient([theta], mode="mgda").step(la, lb)["k_adv"] == 0.5


@pytest.mark.parametrize("mode,biased", [("advibp", False), ("advibp-biased", True)])
def test_bias_correction_makes_the_combined_gradient_unbiased(mode, biased):
    """Noisy gradients g + noise: the mean combined step sum(k_t * g_hat_t) must match sum(k_t * g)
    (the weights applied to the true gradients) for the bias-corrected rule and not for the biased one."""
    torch.manual_seed(5)
    g_a, g_b = torch.tensor([1.0, 0.2], dtype=torch.float64), torch.tensor([0.3, 1.0], dtype=torch.float64)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # L_ver = 0: no k_reg term
    tg = certmin.TwoGradient([theta], mode=mode)
    steps, combined, exact = 4000, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for _ in range(steps):
        noise = torch.randn(2, 2, dtype=torch.float64) * 1.0  # unit noise, larger than the gradients
        _, la, lb = two_losses(g_a + noise[0], g_b + noise[1], theta)
        k = tg.step(la, lb, final=True)
        combined += theta.grad
        exact += k["k_adv"] * g_a + k["k_ver"] * g_b
    error = ((combined - exact).norm() / exact.norm()).item()
    if biased:
        assert error > 0.12, error
    else:
        assert error < 0.05, error


def test_two_gradient_state_round_trip():
    torch.manual_seed(6)
    grads = [(torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)) for _ in range(6)]
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    a = certmin.TwoGradient([theta])
    for g in grads[:3]:
        a.step(*two_losses(*g, theta)[1:], final=True)
    b = certmin.TwoGradient([theta])
    b.load_state_dict(a.state_dict())
    for g in grads[3:]:
        assert a.step(*two_losses(*g, theta)[1:], final=True) == b.step(*two_losses(*g, theta)[1:], final=True)
    with pytest.raises(ValueError, match="unknown weighting mode 'avg'"):
        certmin.TwoGradient([theta], mode="avg")


# ----------------------------------------------------------------------------------------------
# Two processes (gloo) with half a batch each == one process with the whole batch
# ----------------------------------------------------------------------------------------------


def _train_steps(net, x, x_adv, y, group=None, steps=5):
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    tg = certmin.TwoGradient(net.parameters(), group=group)
    for step in range(steps):
        loss_adv, fosc, _ = certmin.adv_loss_and_fosc(net, x_adv, x, y, 0.05)
        loss_ver, _ = certmin.verified_loss(net, x, y, 0.05, beta=0.5)
        opt.zero_grad()
        tg.step(loss_adv, loss_ver, fosc=fosc, c_t=0.01, final=step >= 2)
        opt.step()
    return [p.detach() for p in net.parameters()]


def _data():
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(12, 6), nn.ReLU(),
                        nn.Linear(6, 3)).double()
    x = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64)
    x_adv = (x + 0.05 * torch.randint(-1, 2, x.shape, generator=g)).clamp(0, 1)  # a fixed "attack"
    return net, x, x_adv, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _rank(rank, store, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    net, x, x_adv, y = _data()
    half = slice(rank * 4, rank * 4 + 4)
    params = _train_steps(net, x[half], x_adv[half], y[half], group=dist.group.WORLD)
    torch.save(params, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "params")), nprocs=2, join=True)
    net, x, x_adv, y = _data()
    single = _train_steps(net, x, x_adv, y)
    ranks = [torch.load(tmp_path / f"params.{r}", weights_only=True) for r in range(2)]
    init = [p.detach() for p in _data()[0].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(single, init)), "training must have moved the weights"
    for params in ranks:
        for a, b in zip(params, single):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)
