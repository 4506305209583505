"""certmin: a compact reference implementation of certified (l-inf) training.

Centre: Fan & Li, "Adversarial Training and Provable Robustness: A Tale of Two Objectives"
(AAAI 2021), called AdvIBP: train on an adversarial loss and a verified (bound-based) loss at once,
and weight their two gradients each step with a bias-corrected stochastic multi-gradient rule.

Sections, top to bottom:
  1. models       Normalize and the DeepMind DM-small / medium / large builders
  2. boxes        input_box, margin_spec
  3. bounds       IBP, CROWN-IBP and CROWN for Sequential Linear/Conv2d/ReLU/Flatten/Normalize nets
  4. losses       verified_loss
  5. attacks      fgsm_rs, pgd, fosc
  6. schedules    smooth_ramp, linear_ramp
  7. weighting    TwoGradient, the paper's rule (and its ablations)

This file imports only the standard library and torch: copy it into your project as it is.

    import certmin
    net = certmin.dm_small()
    loss, verified = certmin.verified_loss(net, x, y, eps=0.1, beta=1.0)   # CROWN-IBP
    lb, ub = certmin.bounds(net, *certmin.input_box(x, 0.1), method="crown")
"""
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Normalize", "dm_small", "dm_medium", "dm_large", "input_box", "margin_spec", "bounds",
           "verified_loss", "fgsm_rs", "pgd", "fosc", "adv_loss_and_fosc", "smooth_ramp",
           "linear_ramp", "TwoGradient"]

# ----------------------------------------------------------------------------------------------
# 1. Models
# ----------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """Per-channel (x - mean) / std. The model's first layer, so eps and boxes live in pixel space."""

    def __init__(self, mean, std):
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != std.shape or mean.dim() != 1:
            raise ValueError(f"Normalize needs two 1-D per-channel sequences of equal length, "
                             f"got mean {tuple(mean.shape)} and std {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError(f"Normalize needs std > 0 in every channel, got {std.tolist()}")
        self.register_buffer("mean", mean.view(-1, 1, 1))
        self.register_buffer("std", std.view(-1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _conv_out(side, k, s, p):
    return (side + 2 * p - k) // s + 1


def _build(spec, in_ch, side, classes, mean, std):
    """spec: ("conv", out, kernel, stride, pad) and ("fc", out) entries; ReLU after all but the last."""
    layers = [Normalize(mean, std)] if mean is not None else []
    ch, flat = in_ch, None
    for kind, out, *conv in spec:
        if kind == "conv":
            layers += [nn.Conv2d(ch, out, *conv), nn.ReLU()]
            ch, side = out, _conv_out(side, *conv)
        else:
            if flat is None:
                layers.append(nn.Flatten())
                flat = ch * side * side
            layers += [nn.Linear(flat, out), nn.ReLU()]
            flat = out
    if flat is None:
        layers.append(nn.Flatten())
        flat = ch * side * side
    layers.append(nn.Linear(flat, classes))
    return nn.Sequential(*layers)


def dm_small(in_ch=1, side=28, classes=10, mean=None, std=None):
    """DM-small (Gowal et al. 2018): Conv 16 4x4 s2 p1, Conv 32 4x4 s1 p1, FC 100, FC classes."""
    return _build([("conv", 16, 4, 2, 1), ("conv", 32, 4, 1, 1), ("fc", 100)],
                  in_ch, side, classes, mean, std)


def dm_medium(in_ch=1, side=28, classes=10, mean=None, std=None):
    """DM-medium: Conv 32 3x3 s1 p1, Conv 32 4x4 s2 p1, Conv 64 3x3 s1 p1, Conv 64 4x4 s2 p1, FC 512 x2."""
    return _build([("conv", 32, 3, 1, 1), ("conv", 32, 4, 2, 1), ("conv", 64, 3, 1, 1),
                   ("conv", 64, 4, 2, 1), ("fc", 512), ("fc", 512)], in_ch, side, classes, mean, std)


def dm_large(in_ch=1, side=28, classes=10, mean=None, std=None):
    """DM-large: Conv 64 3x3 p1 x2, Conv 128 3x3 s2 p1, Conv 128 3x3 p1 x2, FC 512."""
    return _build([("conv", 64, 3, 1, 1), ("conv", 64, 3, 1, 1), ("conv", 128, 3, 2, 1),
                   ("conv", 128, 3, 1, 1), ("conv", 128, 3, 1, 1), ("fc", 512)],
                  in_ch, side, classes, mean, std)


# ----------------------------------------------------------------------------------------------
# 2. Boxes and specifications
# ----------------------------------------------------------------------------------------------


def input_box(x, eps, lo=0.0, hi=1.0):
    """The l-inf ball of radius eps around x, clipped to the valid range: (xl, xu)."""
    if not eps >= 0:  # also catches NaN
        raise ValueError(f"eps must be >= 0, got {eps}")
    return (x - eps).clamp(min=lo), (x + eps).clamp(max=hi)


def _others(y, classes):
    """(N, classes-1) indices j != y in increasing order."""
    j = torch.arange(classes - 1, device=y.device).expand(len(y), -1)
    return j + (j >= y.unsqueeze(1)).long()


def margin_spec(y, classes):
    """C (N, classes-1, classes) with rows e_y - e_j for j != y, j increasing: C z = margins."""
    if y.dim() != 1 or not bool(((y >= 0) & (y < classes)).all()):
        raise ValueError(f"margin_spec needs 1-D labels in [0, {classes}), got shape {tuple(y.shape)}")
    eye = torch.eye(classes, device=y.device)
    return eye[y].unsqueeze(1) - eye[_others(y, classes)]


# ----------------------------------------------------------------------------------------------
# 3. Bounds. A network is walked as a flat list of layers. IBP goes forward in centre/radius form;
#    CROWN goes backward with a linear lower bound A x + bias, one row per specification. Upper
#    bounds are lower bounds of the negated specification, so the backward pass has one rule only.
# ----------------------------------------------------------------------------------------------

_SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, Normalize)
METHODS = ("ibp", "crown-ibp", "crown")


def _layers(model):
    """Flatten (nested) Sequentials into a list of supported layers; refuse anything else."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return _layers(model.module)
    if isinstance(model, nn.Sequential):
        return [layer for m in model for layer in _layers(m)]
    if isinstance(model, nn.Flatten) and (model.start_dim != 1 or model.end_dim != -1):
        raise TypeError("certmin bounds support nn.Flatten() with its defaults (start_dim=1, end_dim=-1) only")
    if isinstance(model, nn.Conv2d) and (model.padding_mode != "zeros" or isinstance(model.padding, str)):
        raise TypeError(f"certmin bounds support Conv2d with zero padding given as numbers, got {model}; "
                        "write the padding as integers (padding=1 rather than 'same')")
    if isinstance(model, _SUPPORTED):
        return [model]
    names = ", ".join(t.__name__ for t in _SUPPORTED)
    raise TypeError(f"certmin cannot bound layer {type(model).__name__} ({model}); supported layers: "
                    f"{names}, inside nn.Sequential")


def _affine_count(layers):
    return sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in layers)


def _ibp(layers, xl, xu, C=None, record=False):
    """Interval bounds. Returns (lb, ub, pre, shapes): pre[i] = (l, u) at the input of ReLU i (when
    record), shapes[i] = the input shape of layer i. With C the last Linear layer is elided."""
    if not bool((xl <= xu).all()):
        raise ValueError("the input box is empty somewhere (xl > xu); build it with certmin.input_box")
    c, r = (xu + xl) / 2, (xu - xl) / 2
    pre, shapes, last = {}, [], len(layers) - 1
    for i, m in enumerate(layers):
        shapes.append(c.shape[1:])
        if isinstance(m, nn.Linear):
            if C is not None and i == last:  # elision: bound C W x + C b directly
                C = C.to(m.weight.dtype)
                W = C @ m.weight
                c = (W @ c.unsqueeze(-1)).squeeze(-1) + (C @ m.bias if m.bias is not None else 0)
                r = (W.abs() @ r.unsqueeze(-1)).squeeze(-1)
                return c - r, c + r, pre, shapes
            c, r = F.linear(c, m.weight, m.bias), F.linear(r, m.weight.abs())
        elif isinstance(m, nn.Conv2d):
            c = F.conv2d(c, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
            r = F.conv2d(r, m.weight.abs(), None, m.stride, m.padding, m.dilation, m.groups)
        elif isinstance(m, nn.ReLU):
            l, u = c - r, c + r
            if record:
                pre[i] = (l, u)
            l, u = l.clamp(min=0), u.clamp(min=0)
            c, r = (u + l) / 2, (u - l) / 2
        elif isinstance(m, Normalize):
            c, r = (c - m.mean) / m.std, r / m.std
        else:  # Flatten
            c, r = c.flatten(1), r.flatten(1)
    if C is not None:  # the last layer is not Linear: apply C to the interval
        c, r = (C @ c.unsqueeze(-1)).squeeze(-1), (C.abs() @ r.unsqueeze(-1)).squeeze(-1)
    return c - r, c + r, pre, shapes


def _relax(l, u):
    """Linear ReLU relaxation on [l, u] (method.md section 2): relu(z) >= d_l z and relu(z) <= d_u z + b_u.
    Unstable: chord upper, lower slope 1 if u > -l else 0. Stable neurons are exact."""
    active, unstable = l >= 0, (l < 0) & (u > 0)
    denom = torch.where(unstable, u - l, torch.ones_like(u))  # > 0 where used; 1 elsewhere avoids 0/0
    d_u = torch.where(unstable, u / denom, active.to(u.dtype))
    b_u = torch.where(unstable, -l * d_u, torch.zeros_like(u))
    d_l = torch.where(unstable, (u > -l).to(u.dtype), active.to(u.dtype))
    return d_l, d_u, b_u


def _relu_step_forward(A, d_l, d_u, b_u):
    neg = A < 0
    out = A * torch.where(neg, d_u.unsqueeze(1), d_l.unsqueeze(1))
    bias = (torch.where(neg, A, 0) * b_u.unsqueeze(1)).flatten(2).sum(-1)
    return out, bias


def _relu_step_backward(out, d_l, d_u, b_u, g_out, g_bias):
    # From the output alone: where the two slopes differ (unstable neurons) d_u > 0 and d_l >= 0, so
    # out < 0 exactly where A < 0, and there A = out / d_u. Elsewhere b_u = 0 and the gradients of d_u
    # and b_u are discarded by _relax (constants), so what A_neg holds there does not matter.
    neg = out < 0
    g_bias = g_bias.view(*g_bias.shape, *([1] * (out.dim() - 2)))
    g_A = g_out * torch.where(neg, d_u.unsqueeze(1), d_l.unsqueeze(1)) + torch.where(neg, g_bias * b_u.unsqueeze(1), 0)
    A_neg = torch.where(neg, out / d_u.unsqueeze(1), 0)
    return g_A, (g_out * A_neg).sum(1), (g_bias * A_neg).sum(1)


COMPILE_MIN = int(os.environ.get("CERTMIN_COMPILE_MIN", 2 ** 22))  # elements; <= 0: never
_compiled = {}


def _fused(fn, *args):
    """Run fn compiled when A is large. torch.compile fuses these elementwise chains into one loop
    each: ~6x faster than eager on A of DM-large's size, where eager's many passes over 150 MB tensors
    dominate a CROWN-IBP step. Small tensors, or a platform where compiling fails, run fn as it is."""
    args = [t.detach() for t in args]  # inside autograd.Function already; detached, dynamo traces quietly
    if COMPILE_MIN <= 0 or args[0].numel() < COMPILE_MIN or _compiled.get(fn) is False:
        return fn(*args)
    try:
        if fn not in _compiled:
            _compiled[fn] = torch.compile(fn, dynamic=True)
        return _compiled[fn](*args)
    except Exception as err:  # no compiler, unsupported platform, ...: fall back for good
        warnings.warn(f"certmin: torch.compile failed ({type(err).__name__}: {err}); using eager kernels")
        _compiled[fn] = False
        return fn(*args)


class _ReluStep(torch.autograd.Function):
    """One CROWN step back through a ReLU: A -> A * slope (slope d_l where A >= 0, d_u where A < 0) and
    bias += sum over A < 0 of A * b_u. The hand-written backward saves only the output, which the next
    transposed convolution keeps anyway (autograd's own version keeps five tensors of A's size), and
    lets both directions run fused. d_l is piecewise constant: no gradient."""

    @staticmethod
    def forward(ctx, A, d_l, d_u, b_u):
        out, bias = _fused(_relu_step_forward, A, d_l, d_u, b_u)
        ctx.save_for_backward(out, d_l, d_u, b_u)
        return out, bias

    @staticmethod
    def backward(ctx, g_out, g_bias):
        g_A, g_d_u, g_b_u = _fused(_relu_step_backward, *ctx.saved_tensors, g_out, g_bias)
        return g_A, None, g_d_u, g_b_u


def _backward(layers, A, pre, shapes, upto):
    """CROWN backward pass: a linear lower bound of A . layers[:upto](x) as A_in . x + bias.
    A is (N, S, *output shape of layers[upto-1]); returns A_in (N, S, *input shape) and bias (N, S)."""
    N, S = A.shape[:2]
    bias = A.new_zeros(N, S)
    for i in range(upto - 1, -1, -1):
        m = layers[i]
        if isinstance(m, nn.Linear):
            if m.bias is not None:
                bias = bias + A @ m.bias
            A = A @ m.weight
        elif isinstance(m, nn.Conv2d):
            if m.bias is not None:
                bias = bias + A.sum((-2, -1)) @ m.bias
            # a convolution's transpose is a transposed convolution; output_padding restores the
            # input size that strided convolutions round away
            cin, h, w = shapes[i]
            ho, wo = A.shape[-2:]
            op = [n - ((o - 1) * s - 2 * p + d * (k - 1) + 1) for n, o, s, p, d, k in
                  zip((h, w), (ho, wo), m.stride, m.padding, m.dilation, m.kernel_size)]
            A = F.conv_transpose2d(A.reshape(N * S, *A.shape[2:]), m.weight, None, m.stride, m.padding,
                                   op, m.groups, m.dilation).view(N, S, cin, h, w)
        elif isinstance(m, nn.ReLU):
            A, b = _ReluStep.apply(A, *_relax(*pre[i]))
            bias = bias + b
        elif isinstance(m, Normalize):
            bias = bias - (A * (m.mean / m.std)).flatten(2).sum(-1)
            A = A / m.std
        else:  # Flatten
            A = A.reshape(N, S, *shapes[i])
    return A, bias


def _concretize(A, bias, xl, xu):
    """min over the box of A x + bias, by the centre/radius form."""
    c, r = ((xu + xl) / 2).flatten(1).unsqueeze(-1), ((xu - xl) / 2).flatten(1).unsqueeze(-1)
    A = A.flatten(2)
    return (A @ c).squeeze(-1) - (A.abs() @ r).squeeze(-1) + bias


def _eye_rows(start, stop, n, N, like):
    """Rows start..stop-1 of the n x n identity, shared by N examples; the other rows are never built
    (a full identity over a conv layer's 65536 neurons would take 17 GB)."""
    E = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
    E[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return E.expand(N, -1, -1)


def _crown_intermediate(layers, xl, xu, pre, shapes, budget=2 ** 26, progress=None):
    """Replace the IBP bounds in pre by CROWN bounds, layer by layer (full CROWN). Each neuron is a row
    of an identity specification; rows go in chunks so A stays under `budget` elements. progress, if
    given, is called as progress(rows done, rows in all) after each chunk."""
    N = xl.shape[0]
    biggest = max(math.prod(s) for s in shapes)
    # a prefix with one Linear/Conv is affine in x with a single matrix: IBP is already exact there
    todo = [i for i in sorted(pre) if _affine_count(layers[:i]) > 1]
    total, done = sum(math.prod(shapes[i]) for i in todo), 0
    chunk = max(1, budget // (2 * N * biggest))
    for i in todo:
        shape = shapes[i]
        n = math.prod(shape)
        lows, ups = [], []
        for s in range(0, n, chunk):
            E = _eye_rows(s, min(s + chunk, n), n, N, xl)
            A = torch.cat([E, -E], 1).reshape(N, -1, *shape)
            lb = _concretize(*_backward(layers, A, pre, shapes, i), xl, xu)
            k = E.shape[1]
            lows.append(lb[:, :k])
            ups.append(-lb[:, k:])
            done += k
            if progress is not None:
                progress(done, total)
        pre[i] = (torch.cat(lows, 1).view(N, *shape), torch.cat(ups, 1).view(N, *shape))
    return pre


def bounds(model, xl, xu, C=None, method="ibp", progress=None):
    """Sound (lb, ub) of C f(x) over the box [xl, xu]: (N, S) with C (N, S, classes), else (N, classes).

    method: "ibp" (Gowal et al. 2018), "crown-ibp" (IBP intermediate bounds, CROWN last pass; Zhang
    et al. 2020) or "crown" (CROWN bounds at every layer; costly, for verification: call it under
    torch.no_grad() unless you need its gradient, since autograd keeps every neuron chunk's graph;
    progress(rows done, rows in all) is called as its intermediate neurons are bounded)."""
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
    layers = _layers(model)
    lb, ub, pre, shapes = _ibp(layers, xl, xu, C, record=method != "ibp")
    if method == "ibp":
        return lb, ub
    if method == "crown":
        pre = _crown_intermediate(layers, xl, xu, pre, shapes, progress=progress)
    if C is None:
        C = _eye_rows(0, lb.shape[1], lb.shape[1], lb.shape[0], xl)
    S = C.shape[1]
    A = torch.cat([C, -C], 1).to(xl.dtype)
    lbs = _concretize(*_backward(layers, A, pre, shapes, len(layers)), xl, xu)
    return lbs[:, :S], -lbs[:, S:]


def margin_lower(model, xl, xu, C, beta=0.0):
    """beta * (CROWN-IBP lower bound) + (1 - beta) * (IBP lower bound) of C f over the box: the mixture
    of CROWN-IBP training. One IBP pass serves both; beta = 0 skips the backward pass."""
    layers = _layers(model)
    lb, _, pre, shapes = _ibp(layers, xl, xu, C, record=beta != 0)
    if beta == 0:
        return lb
    lb_crown = _concretize(*_backward(layers, C.to(xl.dtype), pre, shapes, len(layers)), xl, xu)
    return lb_crown if beta == 1 else beta * lb_crown + (1 - beta) * lb


# ----------------------------------------------------------------------------------------------
# 4. The verified loss
# ----------------------------------------------------------------------------------------------


def verified_loss(model, x, y, eps, beta=0.0, lo=0.0, hi=1.0):
    """(loss, verified): batch-mean CE(-m_lb, y), where m_lb is a lower bound of the margins
    z_y - z_j over the eps-box (beta * CROWN-IBP + (1 - beta) * IBP) and m_lb_y = 0;
    verified (N,) is True where every m_lb_j > 0."""
    xl, xu = input_box(x, eps, lo, hi)
    last = _layers(model)[-1]
    if not isinstance(last, nn.Linear):
        raise TypeError("verified_loss needs a model whose last layer is nn.Linear (the logits)")
    classes = last.out_features
    m_lb = margin_lower(model, xl, xu, margin_spec(y, classes).to(x.dtype), beta)
    logits = torch.zeros(len(y), classes, dtype=m_lb.dtype, device=m_lb.device)
    logits = logits.scatter(1, _others(y, classes), -m_lb)
    return F.cross_entropy(logits, y), (m_lb > 0).all(1)


# ----------------------------------------------------------------------------------------------
# 5. Attacks. They move only inside the box, use autograd.grad on the input alone (so no parameter
#    .grad is touched), and leave the model's train/eval mode and requires_grad flags as found.
# ----------------------------------------------------------------------------------------------


def _input_grad(model, x, y):
    """Per-example losses at x and the gradient of each example's own loss with respect to x."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="none")
        grad, = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), logits.detach(), grad


def fgsm_rs(model, x, y, eps, lo=0.0, hi=1.0):
    """FGSM with a random start (Wong et al. 2020): uniform start in the eps-ball, one signed-gradient
    step of 1.25 eps, projected back into the ball and the valid range."""
    xl, xu = input_box(x, eps, lo, hi)
    x0 = torch.min(torch.max(x + torch.empty_like(x).uniform_(-eps, eps), xl), xu)
    _, _, g = _input_grad(model, x0, y)
    return torch.min(torch.max(x0 + 1.25 * eps * g.sign(), xl), xu).detach()


def pgd(model, x, y, eps, steps=200, step_size=None, restarts=1, lo=0.0, hi=1.0):
    """PGD-k with random starts: signed-gradient ascent on the cross-entropy, projected every step.
    Returns, per example, the strongest point seen: a misclassified one if any, else the highest loss."""
    xl, xu = input_box(x, eps, lo, hi)
    alpha = eps / 40 if step_size is None else step_size
    best, best_loss = x.detach().clone(), torch.full_like(y, -math.inf, dtype=x.dtype)
    best_wrong = torch.zeros_like(y, dtype=torch.bool)
    for _ in range(restarts):
        xa = xl + (xu - xl) * torch.rand_like(x)
        for k in range(steps + 1):
            loss, logits, g = _input_grad(model, xa, y)
            wrong = logits.argmax(1) != y
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best[better], best_loss[better], best_wrong[better] = xa[better], loss[better], wrong[better]
            if k < steps:
                xa = torch.min(torch.max(xa + alpha * g.sign(), xl), xu)
    return best


def _fosc(grad, x_adv, x, eps, lo, hi):
    """max over x' in the clipped box of <x' - x_adv, grad>, per example: each coordinate takes the
    box end that the gradient points to."""
    xl, xu = input_box(x, eps, lo, hi)
    return torch.max(grad * (xu - x_adv), grad * (xl - x_adv)).flatten(1).sum(1)


def fosc(model, x_adv, x, y, eps, lo=0.0, hi=1.0):
    """First-order stationarity of the attack (Wang et al. 2019), per example, >= 0; 0 at a
    first-order maximum of the example's own loss inside the box."""
    return _fosc(_input_grad(model, x_adv, y)[2], x_adv, x, eps, lo, hi)


def adv_loss_and_fosc(model, x_adv, x, y, eps, lo=0.0, hi=1.0):
    """(L_adv, batch-mean FOSC, wrong) from one forward pass: L_adv keeps its graph for the parameter
    gradient, FOSC costs one extra input-only backward instead of a second forward; wrong (N,) marks
    the examples that x_adv misclassifies."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y, reduction="none")
    grad, = torch.autograd.grad(loss.sum(), x_adv, retain_graph=True)
    wrong = logits.detach().argmax(1) != y
    return loss.mean(), _fosc(grad.float(), x_adv.detach(), x, eps, lo, hi).mean().item(), wrong


# ----------------------------------------------------------------------------------------------
# 6. Schedules, per iteration
# ----------------------------------------------------------------------------------------------


def linear_ramp(t, start, length, final, init=0.0):
    """init before start, linear to final over [start, start + length], final after."""
    if t <= start:
        return init
    if t >= start + length:
        return final
    return init + (final - init) * (t - start) / length


def smooth_ramp(t, start, length, final, init=0.0):
    """DeepMind IBP's smoothed ramp: init + a (t - start)^4 up to start + length/4, then linear to final
    at start + length, with a chosen so that value and slope are continuous."""
    if t <= start:
        return init
    if t >= start + length:
        return final
    s, mid = t - start, length / 4
    a = (final - init) / (13 * mid ** 4)  # value a mid^4 + slope 4 a mid^3 times the 3 mid that remain
    if s <= mid:
        return init + a * s ** 4
    return init + a * mid ** 4 + 4 * a * mid ** 3 * (s - mid)


# ----------------------------------------------------------------------------------------------
# 7. The two-gradient weighting (method.md section 4)
# ----------------------------------------------------------------------------------------------

MODES = ("advibp", "advibp-biased", "mgda", "sum")


class TwoGradient:
    """Weights the gradients of L_adv and L_ver each step and writes the combination into p.grad.

    During the eps ramp (final=False) the weights come from the current minibatch. Once the verified
    eps is final (final=True), "advibp" and "mgda" compute them from bias-corrected moving averages of
    the *previous* steps' gradients only, so the weights are independent of the current minibatch and
    the combined stochastic gradient is unbiased. "advibp-biased" keeps using the current batch; "sum"
    uses k = (1, 1). Weights use the full parameter vector (the authors' code used the first tensor
    only). With a process group, both gradients (and the losses and FOSC) are averaged across it
    first, so every rank applies the same weights: DistributedDataParallel semantics.
    """

    def __init__(self, params, mode="advibp", beta_grad=0.9, beta_norm=0.99, group=None):
        if mode not in MODES:
            raise ValueError(f"unknown weighting mode {mode!r}; choose one of {', '.join(MODES)}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("TwoGradient got no parameters that require gradients")
        self.mode, self.beta_grad, self.beta_norm, self.group = mode, beta_grad, beta_norm, group
        self.was_final, self.count, self.pending = False, 0, None
        self.m_a = self.m_b = None
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
        """Fold one pair of gradients into the moving averages (Adam-style bias correction on read)."""
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
        """(k_adv, k_ver, k_reg, conflict) from (averaged) gradients m and norms n."""
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
        """Compute both gradients, weight them, write k_adv g_adv + (k_ver + 2 k_reg L_ver) g_ver into
        p.grad (the caller then calls optimizer.step()). Returns the weights and the conflict flag."""
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

    def state_dict(self):
        return {"mode": self.mode, "was_final": self.was_final, "count": self.count, "m_a": self.m_a,
                "m_b": self.m_b, "n_a": self.n_a, "n_b": self.n_b,
                "pending": list(self.pending) if self.pending is not None else None}

    def load_state_dict(self, state):
        dev = self.params[0].device
        move = lambda t: t.to(dev) if t is not None else None  # noqa: E731
        self.was_final, self.count = state["was_final"], state["count"]
        self.m_a, self.m_b, self.n_a, self.n_b = move(state["m_a"]), move(state["m_b"]), state["n_a"], state["n_b"]
        self.pending = tuple(map(move, state["pending"])) if state["pending"] is not None else None
