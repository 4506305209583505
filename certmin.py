"""certmin: a compact reference implementation of certified (l-inf) training.

Centre: Fan & Li, "Adversarial Training and Provable Robustness: A Tale of Two Objectives"
(AAAI 2021), called AdvIBP: train on an adversarial loss and a verified (bound-based) loss at once,
and weight their two gradients each step with a bias-corrected stochastic multi-gradient rule.

The file reads as the paper first, top to bottom:

Part I, training (enough to read the method alone)
  1. models        Normalize, the DeepMind DM-small / medium / large builders, CNN-7, IBP initialisation
  2. boxes         input_box, margin_spec
  3. IBP           the layer walk and interval bounds (Sequential Linear/Conv2d/ReLU/Flatten/Normalize/
                   BatchNorm); BatchNorm's statistics in training: batch_stats, forward, bn_eval; fold_bn
  4. CROWN-IBP     CROWN's backward pass over IBP's ReLU bounds; margin_lower mixes the two
  5. the loss      verified_loss, and warmup_loss (Shi et al.'s warm-up regularisers)
  6. attacks       fgsm_rs, pgd, fosc, adv_loss_and_fosc
  7. schedules     smooth_ramp, linear_ramp
  8. weighting     TwoGradient, the paper's rule (and its ablations)
Part II, verification
  9. bounds()      every method, with full CROWN and alpha-CROWN
 10. exactness     sound_bounds: the same bounds, every rounding charged, for certificates
Part III, kernels
 11. fused steps   IBP's ReLU and CROWN's ReLU step as autograd functions, torch.compile'd when large
 12. arithmetic    ieee: IEEE float32/64 whatever autocast or TF32 the caller set

This file imports only the standard library and torch: copy it into your project as it is.

    import certmin
    net = certmin.dm_small()
    loss, verified = certmin.verified_loss(net, x, y, eps=0.1, beta=1.0)   # CROWN-IBP
    lb, ub = certmin.bounds(net, *certmin.input_box(x, 0.1), method="crown")
    lb, ub = certmin.sound_bounds(net, *certmin.input_box(x, 0.1, outward=True), C, "crown-ibp")  # exact
"""
import copy
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Normalize", "dm_small", "dm_medium", "dm_large", "cnn7", "ibp_init", "input_box", "margin_spec",
           "batch_stats", "forward", "bn_eval", "fold_bn", "bounds", "sound_bounds", "verified_loss", "warmup_loss", "fgsm_rs",
           "pgd", "fosc", "adv_loss_and_fosc", "smooth_ramp", "linear_ramp", "TwoGradient", "ieee"]


# ==============================================================================================
# PART I. TRAINING: what the paper's method needs, readable on its own
# ==============================================================================================


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


def _conv_out(side, k, s, p, d=1):
    return (side + 2 * p - d * (k - 1) - 1) // s + 1


def _build(spec, in_ch, side, classes, mean, std, bn=False):
    """spec: ("conv", out, kernel, stride, pad) and ("fc", out) entries; ReLU after all but the last,
    with bn a BatchNorm between each of those layers and its ReLU."""
    layers = [Normalize(mean, std)] if mean is not None else []
    ch, flat = in_ch, None
    for kind, out, *conv in spec:
        if kind == "conv":
            layers += [nn.Conv2d(ch, out, *conv), *([nn.BatchNorm2d(out)] if bn else []), nn.ReLU()]
            ch, side = out, _conv_out(side, *conv)
        else:
            if flat is None:
                layers.append(nn.Flatten())
                flat = ch * side * side
            layers += [nn.Linear(flat, out), *([nn.BatchNorm1d(out)] if bn else []), nn.ReLU()]
            flat = out
    if flat is None:
        layers.append(nn.Flatten())
        flat = ch * side * side
    layers.append(nn.Linear(flat, classes))
    return nn.Sequential(*layers)


def dm_small(in_ch=1, side=28, classes=10, mean=None, std=None, bn=False):
    """DM-small (Gowal et al. 2018): Conv 16 4x4 s2 p1, Conv 32 4x4 s1 p1, FC 100, FC classes."""
    return _build([("conv", 16, 4, 2, 1), ("conv", 32, 4, 1, 1), ("fc", 100)],
                  in_ch, side, classes, mean, std, bn)


def dm_medium(in_ch=1, side=28, classes=10, mean=None, std=None):
    """DM-medium: Conv 32 3x3 s1 p1, Conv 32 4x4 s2 p1, Conv 64 3x3 s1 p1, Conv 64 4x4 s2 p1, FC 512 x2."""
    return _build([("conv", 32, 3, 1, 1), ("conv", 32, 4, 2, 1), ("conv", 64, 3, 1, 1),
                   ("conv", 64, 4, 2, 1), ("fc", 512), ("fc", 512)], in_ch, side, classes, mean, std)


def dm_large(in_ch=1, side=28, classes=10, mean=None, std=None, bn=False):
    """DM-large: Conv 64 3x3 p1 x2, Conv 128 3x3 s2 p1, Conv 128 3x3 p1 x2, FC 512."""
    return _build([("conv", 64, 3, 1, 1), ("conv", 64, 3, 1, 1), ("conv", 128, 3, 2, 1),
                   ("conv", 128, 3, 1, 1), ("conv", 128, 3, 1, 1), ("fc", 512)],
                  in_ch, side, classes, mean, std, bn)


def cnn7(in_ch=3, side=32, classes=10, mean=None, std=None):
    """CNN-7 (Shi et al. 2021): DM-large's layers with BatchNorm after every convolution and after FC 512."""
    return dm_large(in_ch, side, classes, mean, std, bn=True)


def ibp_init(model):
    """IBP initialisation (Shi et al. 2021): every Linear / Conv2d weight but the last drawn from
    N(0, sigma^2), sigma = sqrt(2 pi) / fan_in, so that at initialisation an IBP box keeps its size from
    layer to layer instead of growing with every layer as it does under the usual initialisations:
    |W| r grows by fan_in E|w| = fan_in sigma sqrt(2 / pi) = 2, and the ReLU after it halves an unstable
    neuron's interval on average. Biases stay."""
    affine = [m for m in _layers(model, walk_only=True) if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for m in affine[:-1]:
            fan_in = m.weight[0].numel()
            m.weight.normal_(0, math.sqrt(2 * math.pi) / fan_in)
    return model


# ----------------------------------------------------------------------------------------------
# 2. Boxes and specifications
# ----------------------------------------------------------------------------------------------


def input_box(x, eps, lo=0.0, hi=1.0, outward=False, dtype=None):
    """The l-inf ball of radius eps around x, clipped to the valid range: (xl, xu). eps may be a 0-dim
    tensor (a CUDA graph's schedule value); checking that one is the caller's job. outward=True (for
    certificates) makes the float box contain the real ball around x's value: x -+ eps in float64,
    rounded to dtype (default x's), then one ulp outward (each rounding to nearest errs by half an ulp
    at most, and float64's is far below a float32 ulp). verify.py passes pixels / 255 in float64 and
    dtype float32: a box around the image itself (to 1e-17), not around its float32 rounding."""
    if not torch.is_tensor(eps) and not eps >= 0:  # also catches NaN
        raise ValueError(f"eps must be >= 0, got {eps}")
    if outward:
        x64, dtype = x.double(), dtype or x.dtype
        return _down((x64 - eps).to(dtype)).clamp(min=lo), _up((x64 + eps).to(dtype)).clamp(max=hi)
    return (x - eps).clamp(min=lo), (x + eps).clamp(max=hi)


def _others(y, classes):
    """(N, classes-1) indices j != y in increasing order."""
    j = torch.arange(classes - 1, device=y.device).expand(len(y), -1)
    return j + (j >= y.unsqueeze(1)).long()


def margin_spec(y, classes, check=True):
    """C (N, classes-1, classes) with rows e_y - e_j for j != y, j increasing: C z = margins.
    check=False skips the label range check, which waits for the GPU (labels checked once by the caller)."""
    if y.dim() != 1:
        raise ValueError(f"margin_spec needs 1-D labels, got shape {tuple(y.shape)}")
    if check and not bool(((y >= 0) & (y < classes)).all()):
        bad = y[(y < 0) | (y >= classes)]
        raise ValueError(f"margin_spec needs labels in [0, {classes}), got {bad[0].item()} "
                         f"({len(bad)} of {len(y)} out of range)")
    eye = torch.eye(classes, device=y.device)
    return eye[y].unsqueeze(1) - eye[_others(y, classes)]


# ----------------------------------------------------------------------------------------------
# 3. IBP. A network is walked as a flat list of layers; IBP goes forward in centre/radius form.
# ----------------------------------------------------------------------------------------------


_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, Normalize, *_BN)
METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")


class _ChannelAffine:
    """A BatchNorm layer as the per-channel affine map it computes, x * scale + shift (scale and shift 1-D
    over channels, broadcast over an input of `dims` dimensions). sound_bounds' copies also carry radius,
    (scale's, shift's): the exact layer's values lie within them of the floats."""

    def __init__(self, scale, shift, dims, radius=None):
        self.scale, self.shift, self.dims, self.radius = scale, shift, dims, radius

    def view(self, t):
        return t.view(-1, *[1] * (self.dims - 2))

    def __call__(self, x):
        return x * self.view(self.scale) + self.view(self.shift)


def _bn_dims(m):
    """The input dimensions BatchNorm m is bounded over: (N, C, H, W) or (N, C)."""
    return 4 if isinstance(m, nn.BatchNorm2d) else 2


def _bn_map(m, mean, var):
    """(scale, shift) of BatchNorm m normalising with these statistics: (x - mean) / sqrt(var + eps) * w + b."""
    scale = torch.rsqrt(var + m.eps)
    scale = scale * m.weight if m.affine else scale
    shift = -mean * scale
    return scale, shift + m.bias if m.affine else shift


def _bn_affine(m, stats):
    """BatchNorm m as a _ChannelAffine: with the clean batch's statistics where stats (batch_stats) has
    them, else, in eval mode, with its running ones."""
    if stats and m in stats:
        return _ChannelAffine(*stats[m], _bn_dims(m))
    if m.training or m.running_mean is None:
        raise ValueError(f"{m} normalises with the statistics of the batch it sees (training mode, or no running "
                         "statistics): pass stats=certmin.batch_stats(model, x) for the clean batch x, or call "
                         "model.eval() to bound the network with its running statistics")
    return _ChannelAffine(*_bn_map(m, m.running_mean, m.running_var), _bn_dims(m))


def _layers(model, stats=None, walk_only=False):
    """Flatten (nested) Sequentials into a list of supported layers; refuse anything else. BatchNorm
    layers become their per-channel affine maps (_bn_affine), unless walk_only (the modules as they are)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return _layers(model.module, stats, walk_only)
    if isinstance(model, nn.Sequential):
        return [layer for m in model for layer in _layers(m, stats, walk_only)]
    if isinstance(model, _BN) and not walk_only:
        return [_bn_affine(model, stats)]
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


def _check_spec(layers, xl, C):
    """A specification C (N, S, K) must have one row block per example and K = the network's outputs."""
    if C is None:
        return
    last = next((m for m in reversed(layers) if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    outputs = last.out_features if isinstance(last, nn.Linear) else None
    if C.dim() != 3 or C.shape[0] != len(xl) or (outputs is not None and C.shape[2] != outputs):
        raise ValueError(f"C must be (examples, specifications, classes) = ({len(xl)}, S, {outputs or 'K'}) for this "
                         f"network and box, got {tuple(C.shape)}; certmin.margin_spec(y, {outputs or 'K'}) builds it")


def _affine_count(layers):
    return sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in layers)


def _ibp_layer(m, c, r):
    """One layer of IBP in centre/radius form, for every layer but ReLU."""
    if isinstance(m, nn.Linear):
        return F.linear(c, m.weight, m.bias), F.linear(r, m.weight.abs())
    if isinstance(m, nn.Conv2d):
        return (F.conv2d(c, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups),
                F.conv2d(r, m.weight.abs(), None, m.stride, m.padding, m.dilation, m.groups))
    if isinstance(m, Normalize):
        return (c - m.mean) / m.std, r / m.std
    if isinstance(m, _ChannelAffine):
        return m(c), r * m.view(m.scale.abs())
    return c.flatten(1), r.flatten(1)  # Flatten


def _centre_radius(xl, xu):
    """The box's centre and radius."""
    return (xu + xl) / 2, (xu - xl) / 2


def _ibp(layers, xl, xu, C=None, record=False, check=True):
    """Interval bounds. Returns (lb, ub, pre, shapes): pre[i] = (l, u) at the input of ReLU i (when
    record), shapes[i] = the input shape of layer i. With C the last Linear layer is elided.
    check=False skips the non-empty box check (for boxes from input_box, non-empty by construction)."""
    if check and not bool((xl <= xu).all()):
        raise ValueError("the input box is empty somewhere (xl > xu); build it with certmin.input_box")
    c, r = _centre_radius(xl, xu)
    pre, shapes, last = {}, [], len(layers) - 1
    for i, m in enumerate(layers):
        shapes.append(c.shape[1:])
        if isinstance(m, _ChannelAffine) and c.dim() != m.dims:
            raise TypeError(f"certmin bounds support BatchNorm1d over (N, C) inputs only, got one over {tuple(c.shape)}")
        if isinstance(m, nn.Linear) and C is not None and i == last:  # elision: bound C W x + C b directly
            C = C.to(m.weight.dtype)
            W = C @ m.weight
            c = (W @ c.unsqueeze(-1)).squeeze(-1) + (C @ m.bias if m.bias is not None else 0)
            r = (W.abs() @ r.unsqueeze(-1)).squeeze(-1)
            return c - r, c + r, pre, shapes
        if isinstance(m, nn.ReLU) and not record:
            c, r = _IbpRelu.apply(c, r)
        elif isinstance(m, nn.ReLU):  # CROWN needs the pre-activation bounds, and their gradient
            l, u = c - r, c + r
            pre[i] = (l, u)
            c, r = _centre_radius(l.clamp(min=0), u.clamp(min=0))
        else:
            c, r = _ibp_layer(m, c, r)
    if C is not None:  # the last layer is not Linear: apply C to the interval
        c, r = (C @ c.unsqueeze(-1)).squeeze(-1), (C.abs() @ r.unsqueeze(-1)).squeeze(-1)
    return c - r, c + r, pre, shapes


def batch_stats(model, x):
    """The clean forward pass of a training step, for networks with BatchNorm: {layer: (scale, shift)},
    each BatchNorm in training mode as the per-channel affine map that the clean batch x's statistics give
    it (differentiable, as in training-mode BatchNorm), which the step's bounds (bounds, verified_loss:
    stats=) and forward(stats=) then share. Updates the running statistics as a training-mode forward
    pass does; it is the only pass of the step that should (attacks run under bn_eval). {} without
    work for a network with no BatchNorm in training mode."""
    layers = _layers(model, walk_only=True)
    training = [i for i, m in enumerate(layers) if isinstance(m, _BN) and m.training]
    stats, h = {}, x
    for m in layers[:training[-1] + 1] if training else []:
        if not (isinstance(m, _BN) and m.training):
            h = m(h)
            continue
        dims = [0, *range(2, h.dim())]
        hw = h.to(torch.promote_types(h.dtype, torch.float32))  # statistics in float32 at least, as BatchNorm's
        mean, var = hw.mean(dims), hw.var(dims, unbiased=False)
        if m.running_mean is not None:
            _update_running(m, mean.detach(), var.detach(), hw.numel() // hw.shape[1])
        stats[m] = _bn_map(m, mean, var)
        h = _ChannelAffine(*stats[m], h.dim())(h)
    return stats


@torch.no_grad()
def _update_running(m, mean, var, n):
    """BatchNorm's running statistics after one training-mode batch of n values per channel (the running
    variance takes the unbiased batch variance)."""
    m.num_batches_tracked.add_(1)
    rate = m.momentum if m.momentum is not None else (1 / m.num_batches_tracked).to(m.running_mean.dtype)  # None: the cumulative average
    m.running_mean.lerp_(mean.to(m.running_mean.dtype), rate)
    m.running_var.lerp_((var * n / max(n - 1, 1)).to(m.running_var.dtype), rate)


def forward(model, x, stats=None):
    """model(x), with each BatchNorm layer in stats (batch_stats) normalising with those statistics and
    updating nothing: the network that a training step's bounds describe, at any input (the
    adversarial loss). Without stats, model(x) itself."""
    if not stats:
        return model(x)
    for m in _layers(model, walk_only=True):
        x = _ChannelAffine(*stats[m], x.dim())(x) if m in stats else m(x)
    return x


def fold_bn(model):
    """A copy of model in which every BatchNorm (eval mode, running statistics) that follows a Linear or
    Conv2d is folded into it: weight rows times the scale, bias b * scale + shift. The same function up to
    rounding, a layer fewer per BatchNorm: the network to deploy. Certificates are per network: sound_bounds
    certifies the copy as it is, not the original."""
    folded = []
    for m in _layers(model, walk_only=True):
        prev = folded[-1] if folded else None
        if not (isinstance(m, _BN) and isinstance(prev, (nn.Linear, nn.Conv2d))):
            folded.append(copy.deepcopy(m))
            continue
        bn = _bn_affine(m, None)
        scale, shift = bn.scale.detach(), bn.shift.detach()
        with torch.no_grad():
            prev.weight.mul_(scale.view(-1, *[1] * (prev.weight.dim() - 1)))
            bias = shift if prev.bias is None else prev.bias * scale + shift
        prev.bias = nn.Parameter(bias.to(prev.weight.dtype))
    return nn.Sequential(*folded).eval()


class bn_eval:
    """with certmin.bn_eval(model): the model's BatchNorm layers in eval mode (running statistics, none
    updated), as attacks during training run them; afterwards each layer's mode as found."""

    def __init__(self, model):
        self.bns = [m for m in _layers(model, walk_only=True) if isinstance(m, _BN)]

    def __enter__(self):
        self.modes = [m.training for m in self.bns]
        for m in self.bns:
            m.train(False)

    def __exit__(self, *exc):
        for m, mode in zip(self.bns, self.modes):
            m.train(mode)


# ----------------------------------------------------------------------------------------------
# 4. CROWN-IBP. CROWN goes backward with a linear lower bound A x + bias, one row per
#    specification. Upper bounds are lower bounds of the negated specification, so the backward
#    pass has one rule only. CROWN-IBP takes its ReLUs' bounds from IBP.
# ----------------------------------------------------------------------------------------------


def _relax(l, u):
    """Linear ReLU relaxation on [l, u] (CROWN's relaxation): relu(z) >= d_l z and relu(z) <= d_u z + b_u.
    Unstable: chord upper, lower slope 1 if u > -l else 0. Stable neurons are exact."""
    active, unstable = l >= 0, (l < 0) & (u > 0)
    denom = torch.where(unstable, u - l, torch.ones_like(u))  # > 0 where used; 1 elsewhere avoids 0/0
    d_u = torch.where(unstable, u / denom, active.to(u.dtype))
    b_u = torch.where(unstable, -l * d_u, torch.zeros_like(u))
    d_l = torch.where(unstable, (u > -l).to(u.dtype), active.to(u.dtype))
    return d_l, d_u, b_u


def _backward(layers, A, pre, shapes, upto, relu_step=None, bias=None, ledger=None):
    """CROWN backward pass: a linear lower bound of A . layers[:upto](x) + bias as A_in . x + bias'.
    A is (N, S, *output shape of layers[upto-1]); returns A_in (N, S, *input shape) and bias' (N, S).
    relu_step(i, A) -> (A, bias), if given, replaces the adaptive relaxation of ReLU i (alpha-CROWN).
    ledger: _FLOATS (floats as they are), or sound_bounds' _Ledger, which charges every step's rounding and
    supplies ReLU relaxations valid exactly."""
    ledger = ledger or _FLOATS
    N, S = A.shape[:2]
    bias = A.new_zeros(N, S) if bias is None else bias
    ledger.begin(bias)
    for i in range(upto - 1, -1, -1):
        m = layers[i]
        ledger.step(i, A)
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
            if relu_step is not None:
                A, b = relu_step(i, A)
            else:
                A, b = _ReluStep.apply(A, *ledger.relax(i, pre))
            bias = bias + b
        elif isinstance(m, Normalize):
            bias = bias - (A * (m.mean / m.std)).flatten(2).sum(-1)
            A = A / m.std
        elif isinstance(m, _ChannelAffine):
            bias = bias + (A * m.view(m.shift)).flatten(2).sum(-1)
            A = A * m.view(m.scale)
        else:  # Flatten
            A = A.reshape(N, S, *shapes[i])
    return A, bias


def _concretize(A, bias, xl, xu, ledger=None):
    """min over the box of A x + bias, by the centre/radius form (a _Ledger charges its rounding; its
    caller then subtracts all charges with ledger.close)."""
    ledger = ledger or _FLOATS
    c, r = ledger.centre_radius(xl, xu)
    ledger.input(A, c.abs() + r)
    c, r, A = c.flatten(1).unsqueeze(-1), r.flatten(1).unsqueeze(-1), A.flatten(2)
    return (A @ c).squeeze(-1) - (A.abs() @ r).squeeze(-1) + bias


def _eye_rows(start, stop, n, N, like):
    """Rows start..stop-1 of the n x n identity, shared by N examples; the other rows are never built
    (a full identity over a conv layer's 65536 neurons would take 17 GB)."""
    E = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
    E[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return E.expand(N, -1, -1)


def _last_pass(layers, xl, xu, C, pre, shapes, outputs, method, alpha_steps, alpha_lr, ledger=None):
    """(lb, ub) of C f (or of the outputs) from the intermediate bounds pre: alpha-CROWN's optimised pass,
    or CROWN's. ledger: as for _backward."""
    ledger = ledger or _FLOATS
    if C is None:
        C = _eye_rows(0, outputs, outputs, len(xl), xl)
    S = C.shape[1]
    A = torch.cat([C, -C], 1).to(xl.dtype)
    if method == "alpha-crown":  # examples are independent (Adam is elementwise): chunks bound the memory
        n = ALPHA_BUDGET // max(1, A.shape[1] * sum(math.prod(shapes[i]) for i in pre))
    elif ledger.sound:  # sound_bounds' passes hold a few more tensors of A's size
        n = SOUND_BUDGET // (A.shape[1] * max(math.prod(s) for s in shapes))
    else:
        n = len(A)
    n, parts = max(1, n), []
    for j in range(0, len(A), n):
        part = slice(j, j + n)
        p = {i: (lo[part], hi[part]) for i, (lo, hi) in pre.items()}
        led = ledger.part(part)
        if method == "alpha-crown":
            parts.append(_alpha_crown(layers, A[part], p, shapes, xl[part], xu[part], alpha_steps, alpha_lr, led))
        else:
            lb = _concretize(*_backward(layers, A[part], p, shapes, len(layers), ledger=led), xl[part], xu[part], led)
            parts.append(led.close(lb))
    lbs = torch.cat(parts)
    return lbs[:, :S], -lbs[:, S:]


def margin_lower(model, xl, xu, C, beta=0.0, check=True, stats=None, pre=None):
    """beta * (CROWN-IBP lower bound) + (1 - beta) * (IBP lower bound) of C f over the box: the mixture
    of CROWN-IBP training. One IBP pass serves both; beta = 0 skips the backward pass. stats: the clean
    batch's BatchNorm statistics (batch_stats). pre: a dict to fill with IBP's bounds (l, u) at each
    ReLU's input, keyed by layer index (for warmup_loss)."""
    layers = _layers(model, stats)
    lb, _, recorded, shapes = _ibp(layers, xl, xu, C, record=beta != 0 or pre is not None, check=check)
    if pre is not None:
        pre.update(recorded)
    if beta == 0:
        return lb
    lb_crown = _concretize(*_backward(layers, C.to(xl.dtype), recorded, shapes, len(layers)), xl, xu)
    return lb_crown if beta == 1 else beta * lb_crown + (1 - beta) * lb


# ----------------------------------------------------------------------------------------------
# 5. The verified loss
# ----------------------------------------------------------------------------------------------


def verified_loss(model, x, y, eps, beta=0.0, lo=0.0, hi=1.0, check=True, stats=None, pre=None):
    """(loss, verified): batch-mean CE(-m_lb, y), where m_lb is a lower bound of the margins
    z_y - z_j over the eps-box (beta * CROWN-IBP + (1 - beta) * IBP) and m_lb_y = 0;
    verified (N,) is True where every m_lb_j > 0. check=False skips the two checks that make the
    host wait for the GPU (labels in range, box non-empty): for a training loop whose labels were
    checked once and whose x lies in [lo, hi]. BatchNorm layers in training mode normalise with the
    clean batch's statistics: stats (batch_stats(model, x)), computed here if not given. pre: as for
    margin_lower."""
    xl, xu = input_box(x, eps, lo, hi)
    last = _layers(model, walk_only=True)[-1]
    if not isinstance(last, nn.Linear):
        raise TypeError("verified_loss needs a model whose last layer is nn.Linear (the logits)")
    classes = last.out_features
    stats = batch_stats(model, x) if stats is None else stats
    m_lb = margin_lower(model, xl, xu, margin_spec(y, classes, check).to(x.dtype), beta, check, stats, pre)
    logits = torch.zeros(len(y), classes, dtype=m_lb.dtype, device=m_lb.device)
    logits = logits.scatter(1, _others(y, classes), -m_lb)
    return F.cross_entropy(logits, y), (m_lb > 0).all(1)


def warmup_loss(pre, xl, xu, tau=0.5, model=None):
    """Shi et al.'s (2021) two warm-up regularisers on IBP's pre-activation bounds pre ({i: (l, u)}, as
    margin_lower(pre=) fills it), averaged over the ReLU layers, as (tightness, relu):
    - tightness, relu(tau - d0 / mean(d)) / tau: d is a layer's mean radius, d0 the input box's (after
      a leading Normalize of model's); zero while the boxes grow less than 1 / tau from the input on;
    - relu, (relu(tau - r_mean) + relu(tau - r_var)) / tau, r_mean the ratio of the active (l > 0) and
      inactive (u < 0) neurons' summed centres (sign flipped), r_var that of their summed squared
      distances from the layer's mean centre, each folded into [0, 1] by min(r, 1 / r): zero while
      neither kind outweighs the other by more than 1 / tau, 2 where one kind is missing. A layer
      where a ratio is 0 / 0 adds nothing to it.
    Both are what the warm-up adds, weighted, to the verified loss while eps ramps up."""
    r = _centre_radius(xl, xu)[1]
    first = _layers(model, walk_only=True)[0] if model is not None else None
    d0 = (r / first.std if isinstance(first, Normalize) else r).mean()
    tight, relu = [], []
    for i in sorted(pre):
        l, u = pre[i]
        centre, radius = (u + l) / 2, (u - l) / 2
        tight.append(F.relu(tau - d0 / radius.mean().clamp(min=1e-12)) / tau)
        active, inactive = (l > 0).to(centre.dtype), (u < 0).to(centre.dtype)
        spread = (centre - centre.mean()) ** 2
        num = torch.stack([(centre * active).sum(), (spread * active).sum()])  # both sums are >= 0
        den = torch.stack([-(centre * inactive).sum(), (spread * inactive).sum()])
        big = torch.maximum(num, den)
        ratios = torch.minimum(num, den) / big.clamp(min=torch.finfo(big.dtype).tiny)  # min(r, 1 / r), no inf
        term = (F.relu(tau - ratios[0]) + F.relu(tau - ratios[1])) / tau
        relu.append(torch.where((big > 0).all(), term, 0))  # on the device: no host sync
    if not pre:
        return r.new_zeros(()), r.new_zeros(())
    return torch.stack(tight).mean(), torch.stack(relu).mean()


# ----------------------------------------------------------------------------------------------
# 6. Attacks. They move only inside the box, use autograd.grad on the input alone (so no parameter
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
    step of 1.25 eps, projected back into the ball and the valid range. eps may be a 0-dim tensor."""
    xl, xu = input_box(x, eps, lo, hi)
    start = (2 * torch.rand_like(x) - 1) * eps  # = uniform_(-eps, eps), bit for bit on the CPU; takes a tensor eps
    x0 = torch.min(torch.max(x + start, xl), xu)
    _, _, g = _input_grad(model, x0, y)
    return torch.min(torch.max(x0 + 1.25 * eps * g.sign(), xl), xu).detach()


def pgd(model, x, y, eps, steps=200, step_size=None, restarts=1, lo=0.0, hi=1.0):
    """PGD-k with random starts: signed-gradient ascent on the cross-entropy, projected every step.
    Returns, per example, the strongest point seen: a misclassified one if any, else the highest loss.
    The bookkeeping is torch.where, not masked assignment, so the device never waits for the host."""
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
            best = torch.where(better.view(-1, *[1] * (x.dim() - 1)), xa, best)
            best_loss = torch.where(better, loss.to(best_loss.dtype), best_loss)
            best_wrong = best_wrong | wrong  # a better point is wrong, or both are right
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


def adv_loss_and_fosc(model, x_adv, x, y, eps, lo=0.0, hi=1.0, params=None, retain_graph=False):
    """(L_adv, batch-mean FOSC, wrong) from one forward pass: L_adv keeps its graph for the parameter
    gradient, FOSC (a 0-dim tensor) costs one extra input-only backward instead of a second forward;
    wrong (N,) marks the examples that x_adv misclassifies.

    With params: (L_adv detached, FOSC, wrong, L_adv's gradients for params) from one backward pass
    for both gradients (the input's, for FOSC, and the parameters', for TwoGradient.step(grad_adv=)):
    a backward pass through the network fewer. FOSC then comes from the mean loss's input gradient
    times N, equal to the per-example gradients up to rounding. retain_graph: keep the graph, for a model
    whose graph another loss shares (BatchNorm statistics from batch_stats)."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y, reduction="none")
    wrong = logits.detach().argmax(1) != y
    if params is None:
        grad, = torch.autograd.grad(loss.sum(), x_adv, retain_graph=True)
        return loss.mean(), _fosc(grad.float(), x_adv.detach(), x, eps, lo, hi).mean(), wrong
    mean = loss.mean()
    *grads, grad = torch.autograd.grad(mean, [*params, x_adv], allow_unused=True, retain_graph=retain_graph)
    fosc = _fosc(grad.float() * len(y), x_adv.detach(), x, eps, lo, hi).mean()
    return mean.detach(), fosc, wrong, grads


# ----------------------------------------------------------------------------------------------
# 7. Schedules, per iteration
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
# 8. The two-gradient weighting
# ----------------------------------------------------------------------------------------------


MODES = ("advibp", "advibp-biased", "mgda", "sum")
SCOPES = ("full", "first")  # which gradient the weights are computed from (the update always uses all of it)


class TwoGradient:
    """Weights the gradients of L_adv and L_ver each step and writes the combination into p.grad.

    During the eps ramp (final=False) the weights come from the current minibatch. Once the verified
    eps is final (final=True), "advibp" and "mgda" compute them from bias-corrected moving averages of
    the *previous* steps' gradients only, so the weights are independent of the current minibatch and
    the combined stochastic gradient is unbiased. "advibp-biased" keeps using the current batch; "sum"
    uses k = (1, 1). scope="full" (the default) computes the weights from the full parameter vector;
    scope="first" from the first trainable tensor's gradient alone, as the authors' code does, and
    applies them to the full gradients. With a process group, both gradients (and the losses and FOSC) are averaged across it
    first, so every rank applies the same weights: DistributedDataParallel semantics.
    """

    def __init__(self, params, mode="advibp", beta_grad=0.9, beta_norm=0.99, group=None, scope="full"):
        if mode not in MODES:
            raise ValueError(f"unknown weighting mode {mode!r}; choose one of {', '.join(MODES)}")
        if scope not in SCOPES:
            raise ValueError(f"unknown gradient scope {scope!r}; choose one of {', '.join(SCOPES)}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("TwoGradient got no parameters that require gradients")
        # how many leading entries of the flat gradient the weights see: all, or the first tensor's
        self.scope, self.scope_n = scope, (self.params[0].numel() if scope == "first" else None)
        self.mode, self.beta_grad, self.beta_norm, self.group = mode, beta_grad, beta_norm, group
        self.was_final, self.pending = False, None
        self.count = torch.zeros((), dtype=torch.float64, device=self.params[0].device)  # pairs averaged
        self.m_a = self.m_b = self.n_a = self.n_b = None  # None: no past yet

    def _grads(self, loss_adv, loss_ver, fosc, grad_adv=None):
        g_a = tuple(grad_adv) if grad_adv is not None else torch.autograd.grad(
            loss_adv, self.params, retain_graph=True, allow_unused=True)
        g_b = torch.autograd.grad(loss_ver, self.params, allow_unused=True)
        flat = [torch.zeros_like(p) if g is None else g for g, p in zip(g_a + g_b, self.params * 2)]
        dev, dt = flat[0].device, flat[0].dtype
        scalars = torch.stack([loss_ver.detach().to(dt), torch.as_tensor(fosc, dtype=dt, device=dev)])
        vec = torch.cat([g.reshape(-1) for g in flat] + [scalars])
        if self.group is not None:
            import torch.distributed as dist
            dist.all_reduce(vec, group=self.group)
            vec /= dist.get_world_size(self.group)
        n = (len(vec) - 2) // 2
        return vec[:n], vec[n:2 * n], vec[-2], vec[-1]

    # The weights stay on the gradients' device: the scalars are float64 0-dim tensors (the same IEEE
    # arithmetic as Python floats), and both branches of every choice are computed and picked with
    # torch.where, so a training step never waits for the GPU to answer a question. The state (count,
    # averages, the pending pair) is updated in place, so a CUDA graph of the step can replay it.

    def _update(self, g_a, g_b):
        """Fold one pair of gradients into the moving averages (Adam-style bias correction on read)."""
        bg, bn = self.beta_grad, self.beta_norm
        if self.m_a is None:
            self.m_a, self.m_b = torch.zeros_like(g_a), torch.zeros_like(g_b)
            self.n_a, self.n_b = g_a.new_zeros((), dtype=torch.float64), g_a.new_zeros((), dtype=torch.float64)
            self.count.zero_()
        self.count += 1
        self.m_a.copy_(bg * self.m_a + (1 - bg) * g_a)
        self.m_b.copy_(bg * self.m_b + (1 - bg) * g_b)
        self.n_a.copy_(bn * self.n_a + (1 - bn) * g_a.norm().double())
        self.n_b.copy_(bn * self.n_b + (1 - bn) * g_b.norm().double())

    def _averages(self):
        cg, cn = 1 - self.beta_grad ** self.count, 1 - self.beta_norm ** self.count
        return self.m_a / cg, self.m_b / cg, self.n_a / cn, self.n_b / cn

    def weights(self, m_a, m_b, n_a, n_b, fosc, c_t, final):
        """(k_adv, k_ver, k_reg, conflict), 0-dim tensors, from (averaged) gradients m and norms n."""
        where, f64 = torch.where, dict(dtype=torch.float64, device=m_a.device)
        one, zero = torch.ones((), **f64), torch.zeros((), **f64)
        d = torch.dot(m_a, m_b).double()
        conflict = d <= 0
        if self.mode == "sum":
            return one, one, zero, conflict
        if self.mode == "mgda":  # closed-form min-norm point of the segment [m_b, m_a]
            diff = (m_a - m_b).pow(2).sum().double()
            alpha = where(diff == 0, 0.5, (torch.dot(m_b - m_a, m_b).double() / diff).clamp(0, 1))
            return alpha, 1 - alpha, zero, conflict
        # no conflict: follow the bisector of the two normalised gradients
        b = m_a / n_a + m_b / n_b
        gamma = (n_a + n_b + d / n_a + d / n_b) / (2 * b.pow(2).sum().double())
        k_adv, k_ver = (gamma, gamma * n_a / n_b) if final else (gamma / n_a, gamma / n_b)  # final: the authors' scaling
        # conflict: project the gradient without priority off the prioritised one
        project_ver = where(n_b > 0, -d / n_b ** 2, zero)
        project_adv = where(n_a > 0, -d / n_a ** 2, zero)
        adv_first = torch.as_tensor(fosc, **f64) <= c_t  # attack converged: the adversarial gradient has priority
        k_adv = where(conflict, where(adv_first, one, project_adv), k_adv)
        k_ver = where(conflict, where(adv_first, project_ver, one), k_ver)
        k_reg = where(conflict, 0.5 if final else 0.0, zero)
        return k_adv, k_ver, k_reg, conflict

    def step(self, loss_adv, loss_ver, fosc=0.0, c_t=0.0, final=False, grad_adv=None):
        """Compute both gradients, weight them, write k_adv g_adv + (k_ver + 2 k_reg L_ver) g_ver into
        p.grad (the caller then calls optimizer.step()). Returns the weights (0-dim tensors on the
        gradients' device, read them when you need them), the conflict flag and both gradient norms.
        grad_adv: L_adv's gradients for the parameters, if you have them (adv_loss_and_fosc(params=))."""
        g_a, g_b, l_ver, fosc = self._grads(loss_adv, loss_ver, fosc, grad_adv)
        if final and not self.was_final:  # restart the averages at the first step with the final eps
            self.m_a, self.pending = None, None
        self.was_final = self.was_final or final
        w_a, w_b = g_a[:self.scope_n], g_b[:self.scope_n]  # what the weights see (views: no copy)
        norm_a, norm_b = w_a.norm(), w_b.norm()
        if not final or self.mode in ("advibp-biased", "sum"):
            m_a, m_b, n_a, n_b = w_a, w_b, norm_a.double(), norm_b.double()
        else:
            if self.m_a is None:  # no past yet: take the current gradients
                self._update(w_a, w_b)
            else:  # the averages hold previous steps only; the current pair waits for the next step
                if self.pending is None:
                    self.pending = (w_a.clone(), w_b.clone())
                else:
                    self._update(*self.pending)
                    self.pending[0].copy_(w_a)
                    self.pending[1].copy_(w_b)
            m_a, m_b, n_a, n_b = self._averages()
        k_adv, k_ver, k_reg, conflict = self.weights(m_a, m_b, n_a, n_b, fosc, c_t, final)
        combined = k_adv * g_a + (k_ver + 2 * k_reg * l_ver.double()) * g_b
        offset = 0
        for p in self.params:  # each gradient in its parameter's memory layout (channels_last too)
            p.grad = torch.empty_like(p).copy_(combined[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return {"k_adv": k_adv, "k_ver": k_ver, "k_reg": k_reg, "conflict": conflict,
                "g_adv_norm": norm_a, "g_ver_norm": norm_b}

    def state_dict(self):
        return {"mode": self.mode, "scope": self.scope, "was_final": self.was_final, "count": int(self.count), "m_a": self.m_a,
                "m_b": self.m_b, "n_a": self.n_a, "n_b": self.n_b,
                "pending": list(self.pending) if self.pending is not None else None}

    def load_state_dict(self, state):
        if state.get("scope", "full") != self.scope:
            raise ValueError(f"this state was saved with scope {state.get('scope', 'full')!r}, not {self.scope!r}")
        dev = self.params[0].device
        move = lambda t: t.to(dev, copy=True) if t is not None else None  # noqa: E731; copies: the state is updated in place
        self.was_final = state["was_final"]
        self.count.fill_(state["count"] if state["m_a"] is not None else 0)
        norm = lambda v: None if v is None else torch.as_tensor(v, dtype=torch.float64, device=dev).clone()  # noqa: E731
        self.m_a, self.m_b, self.n_a, self.n_b = move(state["m_a"]), move(state["m_b"]), norm(state["n_a"]), norm(state["n_b"])
        self.pending = tuple(map(move, state["pending"])) if state["pending"] is not None else None


# ==============================================================================================
# PART II. VERIFICATION: the tightest bounds, and bounds that hold in exact arithmetic
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# 9. bounds(): full CROWN (every unstable neuron's own backward pass) and alpha-CROWN
# ----------------------------------------------------------------------------------------------


ALPHA_STEPS, ALPHA_LR = 20, 0.1  # alpha-CROWN's defaults: projected Adam steps and their rate
ALPHA_BUDGET = 2 ** 24  # alpha variables (examples x rows x ReLU neurons) optimised at once


def _window(T, y0, x0, h, w):
    """(N, R, C, h, w): for every row r of example n, T[n, :, y0:y0+h, x0:x0+w], zero outside T. One
    gather from a zero-padded copy (advanced indexing over five dimensions was 5x slower)."""
    N, C, H, W = T.shape
    R = y0.shape[1]
    P = max(0, -int(min(y0.min(), x0.min())), int(max(y0.max() + h - H, x0.max() + w - W)))
    Wp = W + 2 * P
    ys, xs = y0.unsqueeze(-1) + P + torch.arange(h, device=T.device), x0.unsqueeze(-1) + P + torch.arange(w, device=T.device)
    flat = (ys.unsqueeze(-1) * Wp + xs.unsqueeze(-2)).view(N, 1, R * h * w).expand(-1, C, -1)
    return F.pad(T, (P, P, P, P)).flatten(2).gather(2, flat).view(N, C, R, h, w).transpose(1, 2)


def _patch_start(layers, i, idx, shapes):
    """The rows of _patch_bounds before its walk: (A, bias, y0, x0, the first layer to walk back through).
    Below a Conv2d, each row is its neuron's kernel over the receptive field; below a BatchNorm (on a
    Conv2d), a one-hot patch of one pixel over its output's channels, which the walk takes back
    through both."""
    cout, H, W = shapes[i]
    o, oh, ow = idx // (H * W), (idx // W) % H, idx % W
    N, k = idx.shape
    ar = lambda n: torch.arange(n, device=idx.device)  # noqa: E731
    conv = layers[i - 1]
    if not isinstance(conv, nn.Conv2d):
        A = layers[i - 2].weight.new_zeros(N, k, cout, 1, 1)
        A[ar(N).view(N, 1), ar(k).view(1, k), o, 0, 0] = 1
        return torch.cat([A, -A], 1), A.new_zeros(N, 2 * k), oh.repeat(1, 2), ow.repeat(1, 2), i - 1
    cin, cg = shapes[i - 1][0], conv.weight.shape[1]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    A = conv.weight.new_zeros(N, k, cin, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    ci = ((o // (cout // conv.groups)) * cg).unsqueeze(-1) + ar(cg)
    A[ar(N).view(N, 1, 1, 1, 1), ar(k).view(1, k, 1, 1, 1), ci[..., None, None], (ar(kh) * dh).view(1, 1, 1, kh, 1),
      (ar(kw) * dw).view(1, 1, 1, 1, kw)] = conv.weight[o]
    bias = conv.bias[o] if conv.bias is not None else A.new_zeros(N, k)
    A, bias = torch.cat([A, -A], 1), torch.cat([bias, -bias], 1)       # lower rows, then upper rows
    y0, x0 = (oh * sh - ph).repeat(1, 2), (ow * sw - pw).repeat(1, 2)   # each patch's top-left corner
    return A, bias, y0, x0, i - 2


def _patch_bounds(layers, i, idx, pre, shapes, xl, xu, ledger=None):
    """Lower and upper CROWN bounds (N, k) of the pre-activations idx (N, k) of ReLU i, whose layer
    i - 1 is a Conv2d (or a BatchNorm on one) with only Conv2d / ReLU / Normalize / BatchNorm below it. A
    conv neuron depends on its receptive field alone, so each row is kept as a patch over that field and
    its offset (the layout auto_LiRPA calls "patches"): the backward pass costs the field's size, not the
    image's. ledger: as for _backward (the bounds come back with every rounding charged)."""
    ledger = ledger or _FLOATS
    A, bias, y0, x0, top = _patch_start(layers, i, idx, shapes)
    N, k = idx.shape
    ledger.begin(bias)
    for j in range(top, -1, -1):
        m = layers[j]
        h, w = A.shape[-2:]
        ledger.step(j, A, lambda v: _window(v, y0, x0, h, w))  # (called within step)
        if isinstance(m, nn.ReLU):  # (entries over the padding of the layer above get slopes 0: no neurons)
            relax = ledger.relax(j, pre)
            d_l, d_u, b_u = _window(torch.cat(relax, 1), y0, x0, h, w).chunk(3, 2)
            neg = A.clamp(max=0)
            bias = bias + (neg * b_u).flatten(2).sum(-1)
            A = A.clamp(min=0) * d_l + neg * d_u
            continue
        H, W = shapes[j + 1][1:]  # entries over the padding of the layer above are constant zeros, not neurons
        ys, xs = y0.unsqueeze(-1) + torch.arange(h, device=A.device), x0.unsqueeze(-1) + torch.arange(w, device=A.device)
        A = A * (((ys >= 0) & (ys < H)).unsqueeze(-1) & ((xs >= 0) & (xs < W)).unsqueeze(-2)).unsqueeze(2)
        if isinstance(m, Normalize):
            bias = bias - (A * (m.mean / m.std)).flatten(2).sum(-1)
            A = A / m.std
        elif isinstance(m, _ChannelAffine):
            bias = bias + (A * m.view(m.shift)).flatten(2).sum(-1)
            A = A * m.view(m.scale)
        else:  # Conv2d: its transpose maps a patch to the patch of its receptive field
            if m.bias is not None:
                bias = bias + A.sum((-2, -1)) @ m.bias
            A = F.conv_transpose2d(A.flatten(0, 1), m.weight, None, m.stride, 0, 0, m.groups, m.dilation)
            A = A.view(N, 2 * k, *A.shape[1:])
            y0, x0 = y0 * m.stride[0] - m.padding[0], x0 * m.stride[1] - m.padding[1]
    h, w = A.shape[-2:]
    c, r = (_window(t, y0, x0, h, w) for t in ledger.centre_radius(xl, xu))  # zero outside the image
    lb = (A * c).flatten(2).sum(-1) - (A.abs() * r).flatten(2).sum(-1) + bias
    ledger.input(A, c.abs() + r)
    lb = ledger.close(lb)
    return lb[:, :k], -lb[:, k:]


def _patch_elements(layers, i, shapes):
    """The largest patch (elements per row) of _patch_bounds for ReLU i, or None where patches do not
    apply (layer i - 1 is neither a Conv2d nor a BatchNorm on one, or a Flatten / Linear lies below it)."""
    top = i - 2 if isinstance(layers[i - 1], _ChannelAffine) and i >= 2 else i - 1  # the convolution
    if not (isinstance(layers[top], nn.Conv2d) and
            all(isinstance(m, (nn.Conv2d, nn.ReLU, Normalize, _ChannelAffine)) for m in layers[:top])):
        return None
    m = layers[top]
    h, w = [(k - 1) * d + 1 for k, d in zip(m.kernel_size, m.dilation)]
    size = max(shapes[top][0] * h * w, shapes[i][0])
    for j in range(top - 1, -1, -1):
        m = layers[j]
        if isinstance(m, nn.Conv2d):
            h, w = [(a - 1) * s + (k - 1) * d + 1 for a, s, k, d in zip((h, w), m.stride, m.kernel_size, m.dilation)]
            size = max(size, shapes[j][0] * h * w)
    return size


def _crown_intermediate(layers, xl, xu, pre, shapes, budget=2 ** 26, progress=None, ledger=None):
    """Full CROWN: replace the IBP bounds in pre by tighter ones, layer by layer. At each ReLU the
    bounds are first IBP from the (already tightened) ReLU before; then the neurons that these leave
    unstable (l < 0 < u) get a CROWN backward pass each, and keep the tighter of their IBP and CROWN
    bounds. Both savings are sound: a stable neuron's relaxation is exact whatever its bounds, and
    the intersection of two boxes that contain the set contains it. Rows go in chunks so that A stays
    under `budget` elements; progress(neurons done, neurons in all) is called after each chunk. ledger:
    a _Floats (the default) keeps the float IBP chain; sound_bounds' _Ledger has sound IBP boxes, and
    every CROWN pass has its rounding charged."""
    ledger = ledger or _Floats(layers, xl, xu)
    N = xl.shape[0]
    biggest = max(math.prod(s) for s in shapes)
    # a prefix with one Linear/Conv is affine in x with a single matrix: IBP is already exact there
    todo = [i for i in sorted(pre) if _affine_count(layers[:i]) > 1]
    total, done = sum(math.prod(shapes[i]) for i in todo), 0
    for i in sorted(pre):
        pre[i] = ledger.box(i)  # IBP from the tightened box of the ReLU before
        if i in todo:
            shape, n, affine = shapes[i], math.prod(shapes[i]), layers[i - 1]
            patch = _patch_elements(layers, i, shapes)
            chunk = max(1, budget // (2 * N * (patch or biggest)))
            l, u = (t.reshape(N, n) for t in pre[i])
            rows = (l < 0) & (u > 0)
            count = rows.sum(1)
            S = int(count.max()) if n else 0
            order = torch.argsort((~rows).to(torch.uint8), dim=1, stable=True)[:, :S]  # each example's rows first
            new_l, new_u = l.clone(), u.clone()
            for s in range(0, S, chunk):
                idx = order[:, s:s + chunk]
                k = idx.shape[1]
                valid = torch.arange(s, s + k, device=idx.device) < count.unsqueeze(1)
                if patch:
                    low, up = _patch_bounds(layers, i, idx, pre, shapes, xl, xu, ledger)
                else:
                    if isinstance(affine, nn.Linear):  # start below the Linear layer: its rows
                        A = affine.weight[idx]
                        b = affine.bias[idx] if affine.bias is not None else A.new_zeros(idx.shape)
                        A, b, upto = torch.cat([A, -A], 1), torch.cat([b, -b], 1).to(xl.dtype), i - 1
                    else:  # one-hot rows over the layer's neurons
                        E = torch.zeros(N, k, n, dtype=xl.dtype, device=xl.device).scatter_(2, idx.unsqueeze(-1), 1)
                        A, b, upto = torch.cat([E, -E], 1).reshape(N, -1, *shape), None, i
                    lb = _concretize(*_backward(layers, A.to(xl.dtype), pre, shapes, upto, bias=b, ledger=ledger),
                                     xl, xu, ledger)
                    lb = ledger.close(lb)
                    low, up = lb[:, :k], -lb[:, k:]
                low, up = torch.max(low, l.gather(1, idx)), torch.min(up, u.gather(1, idx))
                new_l = new_l.scatter(1, idx, torch.where(valid, low, new_l.gather(1, idx)))
                new_u = new_u.scatter(1, idx, torch.where(valid, up, new_u.gather(1, idx)))
                if progress is not None:
                    progress(done + n * (s + k) // S, total)
            pre[i] = (new_l.view(N, *shape), new_u.view(N, *shape))
            done += n
            if progress is not None and S == 0:
                progress(done, total)
        ledger.tighten(i, *pre[i])  # the next boxes: IBP from this one
    return pre


def _alpha_crown(layers, A, pre, shapes, xl, xu, steps, lr, ledger=None):
    """alpha-CROWN's last pass: the lower slope of every unstable neuron, one per specification row,
    becomes a variable alpha in [0, 1], started at the adaptive slope and moved by Adam (projected) to
    raise the bound. Any alpha in [0, 1] gives a sound bound, so the best per row is kept. ledger: as
    for _backward (each step's bound has its rounding charged before it can be the best)."""
    ledger = ledger or _FLOATS
    relax = {i: ledger.relax(i, {i: tuple(t.detach() for t in pre[i])}) for i in pre}
    unstable = {i: (pre[i][0] < 0) & (pre[i][1] > 0) for i in pre}
    S2 = A.shape[1]
    alpha = {i: relax[i][0].unsqueeze(1).expand(-1, S2, *relax[i][0].shape[1:]).clone().requires_grad_(True)
             for i in pre if bool(unstable[i].any())}

    def step(i, A):
        d_l, d_u, b_u = relax[i]
        low = torch.where(unstable[i].unsqueeze(1), alpha[i], d_l.unsqueeze(1)) if i in alpha else d_l.unsqueeze(1)
        neg = A.clamp(max=0)
        return A.clamp(min=0) * low + neg * d_u.unsqueeze(1), (neg * b_u.unsqueeze(1)).flatten(2).sum(-1)

    def bound():
        lb = _concretize(*_backward(layers, A, pre, shapes, len(layers), step, ledger=ledger), xl, xu, ledger)
        return lb, ledger.close(lb.detach())

    A = A.detach()
    with torch.enable_grad():
        best = bound()[1]  # = CROWN
        opt = torch.optim.Adam(list(alpha.values()), lr=lr) if alpha else None
        for _ in range(steps if alpha else 0):
            lb, sound = bound()
            best = torch.max(best, sound)
            grads = torch.autograd.grad(-lb.sum(), list(alpha.values()))
            for a, g in zip(alpha.values(), grads):
                a.grad = g
            opt.step()
            with torch.no_grad():
                for a in alpha.values():
                    a.clamp_(0, 1)
        if alpha:  # the last step's alpha too
            with torch.no_grad():
                best = torch.max(best, bound()[1])
    return best


def bounds(model, xl, xu, C=None, method="ibp", progress=None, alpha_steps=ALPHA_STEPS, alpha_lr=ALPHA_LR,
           stats=None):
    """Sound (lb, ub) of C f(x) over the box [xl, xu]: (N, S) with C (N, S, classes), else (N, classes).

    method: "ibp" (Gowal et al. 2018), "crown-ibp" (IBP intermediate bounds, CROWN last pass; Zhang
    et al. 2020), "crown" (CROWN bounds for every unstable neuron; costly, for verification: call it
    under torch.no_grad() unless you need its gradient) or "alpha-crown" (CROWN, then alpha_steps
    projected Adam steps of rate alpha_lr on the last pass's lower ReLU slopes; never looser than
    CROWN; no gradient). progress(neurons done, neurons in all) is called as full CROWN bounds the
    hidden layers. The arithmetic is IEEE float32 or float64 whatever autocast or TF32 the caller set.
    BatchNorm layers are per-channel affine maps: in eval mode with their running statistics, in
    training mode with the clean batch's, stats (batch_stats)."""
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
    layers = _layers(model, stats)
    _check_spec(layers, xl, C)
    with ieee(xl.device.type):
        return _bounds(layers, xl, xu, C, method, progress, alpha_steps, alpha_lr)


def _bounds(layers, xl, xu, C, method, progress, alpha_steps, alpha_lr):
    lb, ub, pre, shapes = _ibp(layers, xl, xu, C, record=method != "ibp")
    if method == "ibp":
        return lb, ub
    if method in ("crown", "alpha-crown"):
        pre = _crown_intermediate(layers, xl, xu, pre, shapes, progress=progress)
    return _last_pass(layers, xl, xu, C, pre, shapes, lb.shape[1], method, alpha_steps, alpha_lr)


# ----------------------------------------------------------------------------------------------
# 10. Bounds that hold in exact arithmetic. A bound computed in floats is a bound of neither the float
#     nor the real network until its rounding is accounted for. sound_bounds is each method with
#     every rounding bounded and added outward: an inner product of n terms computed in floats, in any
#     order, with or without FMA, errs by at most gamma_n = n u / (1 - n u) times the inner product of
#     the absolute values (u: the unit roundoff; Higham, Accuracy and Stability of Numerical
#     Algorithms, 2002, section 3.1), plus what underflow loses (at most the smallest normal number
#     per operation); a single rounding to nearest errs by half an ulp, so one ulp outward covers it.
# ----------------------------------------------------------------------------------------------


def _up(t):
    return torch.nextafter(t, t.new_tensor(math.inf))


def _down(t):
    return torch.nextafter(t, t.new_tensor(-math.inf))


def _gamma(n, dtype):
    """2 (n + 2) u, exact in floats: gamma_{n+1} (an inner product of n terms plus a bias), with twice
    the room needed for the rounding of the error term itself (which is below (n + 5) u <= 1e-2)."""
    u = torch.finfo(dtype).eps / 2
    if (n + 5) * u > 1e-2:
        raise ValueError(f"inner products of {n} terms are too long to bound rounding in {dtype}; use float64")
    return 2 * (n + 2) * u


def _enclose(lo, hi):
    """A float centre and radius whose exact interval [c - r, c + r] contains [lo, hi]."""
    c = (lo + hi) / 2
    return c, _up(torch.maximum(hi - c, c - lo))  # each difference rounded once: one ulp up covers it


def _affine_parts(m):
    """(n, f): f(x, W, b) = W x + b for a Linear or Conv2d layer m and x (K, N, *shape), as a plain matrix
    product (convolution kernels may use Winograd or FFT, whose errors the inner-product bound does not
    cover); n terms each."""
    if isinstance(m, nn.Linear):
        return m.in_features, F.linear
    G = m.groups
    n = m.weight[0].numel()

    def conv(x, W, b):
        cols = F.unfold(x.flatten(0, 1), m.kernel_size, m.dilation, m.padding, m.stride)  # copies: exact
        y = W.reshape(G, W.shape[0] // G, n) @ cols.unflatten(1, (G, n))  # (K N, G, out / G, L)
        side = [_conv_out(x.shape[3 + j], m.kernel_size[j], m.stride[j], m.padding[j], m.dilation[j]) for j in (0, 1)]
        y = y.reshape(*x.shape[:2], W.shape[0], *side)
        return y if b is None else y + b.view(-1, 1, 1)
    return n, conv


def _per_example(x, W, b):
    """W x + b with one matrix per example (W (N, S, n), x (K, N, n)): the elided or specification layer."""
    y = (W @ x.unsqueeze(-1)).squeeze(-1)
    return y if b is None else y + b


def _sound_affine(lo, hi, n, f, W, b, extra=None):
    """[lo', hi'] containing W x + b, exactly, for every real x in [lo, hi]. With (c, r) enclosing the
    box, W x + b lies within |W| r of W c + b; the computed W c + b and |W| r err by at most
    gamma_{n+1} (|W| (|c| + r) + |b|) together. extra: a further error bound to add (same shape)."""
    c, r = _enclose(lo, hi)
    cw = f(c.unsqueeze(0), W, b)[0]
    rw, s = f(torch.stack([r, c.abs() + r]), W.abs(), None)  # one pass for both |W| products
    if b is not None:  # a layer's bias (out,) broadcasts over a convolution's pixels; an elided one is (N, S)
        s = s + (b.abs().view(-1, *[1] * (s.dim() - 2)) if b.dim() == 1 else b.abs())
    err = _gamma(n, c.dtype) * s + 2 * (n + 1) * torch.finfo(c.dtype).tiny  # the tiny term: underflow
    R = _up(rw + err + (0 if extra is None else extra))  # nonnegative terms: one ulp up covers both roundings
    return _down(cw - R), _up(cw + R)


SOUND_METHODS = METHODS
SOUND_BUDGET = 2 ** 24  # elements of A in a chunk of examples of sound_bounds' last pass (128 MB in float64)


def sound_bounds(model, xl, xu, C=None, method="ibp", dtype=torch.float64, progress=None,
                 alpha_steps=ALPHA_STEPS, alpha_lr=ALPHA_LR):
    """Bounds (lb, ub) of C f(x) over [xl, xu] (as bounds() returns them, in dtype) that hold in exact
    arithmetic: for every real x in the box, the real network with these weights lies inside. Any of
    METHODS, computed by the code of bounds() with every rounding charged where it happens (IBP: each
    layer's, _sound_step; the backward passes: _Ledger). The charges assume that every rounding errs
    the same way, by the most it can, so the arithmetic is float64 by default, where they are about
    1e-11 of the margins' scale (float32 arithmetic is refused where an inner product has more than
    ~160 000 terms). Convolutions run as matrix products (cuDNN and oneDNN off; a Winograd or FFT kernel
    would escape the inner-product bound). The weights and box convert exactly into a dtype at least as
    wide as theirs. progress, alpha_steps, alpha_lr: as for bounds(). For certificates; no gradient."""
    if method not in SOUND_METHODS:
        raise ValueError(f"sound_bounds has no method {method!r}; choose one of {', '.join(SOUND_METHODS)}")
    layers = _layers(model, walk_only=True)
    _check_spec(layers, xl, C)
    for m in layers:
        if isinstance(m, _BN) and (m.training or m.running_mean is None):
            raise ValueError(f"sound_bounds certifies networks as they are evaluated: {m} normalises with each "
                             "batch's statistics (training mode, or no running statistics); call model.eval()")
    if not bool((xl <= xu).all()):
        raise ValueError("the input box is empty somewhere (xl > xu); build it with certmin.input_box")
    narrow = [t.dtype for t in (xl, xu, *model.parameters(), *model.buffers()) if t.is_floating_point()
              and torch.finfo(t.dtype).eps < torch.finfo(dtype).eps]
    if narrow:
        raise ValueError(f"sound_bounds in {dtype} would round values of type {narrow[0]}; use dtype=torch.float64")
    lo, hi, C = xl.to(dtype), xu.to(dtype), None if C is None else C.to(dtype)
    was = torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled
    torch.backends.cudnn.enabled = torch.backends.mkldnn.enabled = False
    try:
        with ieee(xl.device.type), torch.no_grad():
            layers = [_sound_bn(m, dtype) if isinstance(m, _BN) else copy.deepcopy(m).to(dtype).requires_grad_(False)
                      for m in layers]
            if method == "ibp":
                for i, m in enumerate(layers):
                    if isinstance(m, nn.Linear) and C is not None and i == len(layers) - 1:
                        return _sound_elided(m, lo, hi, C)
                    lo, hi = _sound_step(m, lo, hi)
                if C is not None:  # the last layer is not Linear: C is one more affine map, with no bias
                    lo, hi = _sound_affine(lo, hi, C.shape[-1], _per_example, C, None)
                return lo, hi
            out, _, pre, shapes = _ibp(layers, lo[:1], hi[:1], record=True, check=False)  # the shapes alone
            ledger = _Ledger(layers, lo, hi)
            if method == "crown-ibp":
                pre = {i: ledger.box(i) for i in pre}
            else:
                pre = _crown_intermediate(layers, lo, hi, pre, shapes, progress=progress, ledger=ledger)
            return _last_pass(layers, lo, hi, C, pre, shapes, out.shape[1], method, alpha_steps, alpha_lr, ledger)
    finally:
        torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled = was


def _sound_bn(m, dtype):
    """BatchNorm m (eval mode) as a _ChannelAffine in dtype whose radius bounds the rounding of its scale
    and shift: the exact layer is x * s + t with s = w / sqrt(var + eps) and t = b - mean * s. The float
    scale takes up to four roundings (eps into dtype, the sum, the root, which halves its operand's
    relative error, the quotient), so it errs by at most about 3.5 u |scale|; 6 u leaves room for the
    second-order terms and the radius's own rounding. The shift errs by |mean| times that, plus the
    product's and the difference's roundings, u (|mean scale| + |b - mean scale|) <= 2 u (|mean scale|
    + |b|) and 4 u leaves room; the tiny terms cover underflow."""
    u, tiny = torch.finfo(dtype).eps / 2, torch.finfo(dtype).tiny
    mean, var = m.running_mean.to(dtype), m.running_var.to(dtype)
    scale = 1 / torch.sqrt(var + m.eps)
    if m.affine:
        scale = m.weight.to(dtype) * scale
    product = mean * scale
    b = m.bias.to(dtype) if m.affine else torch.zeros_like(mean)
    if not bool(scale.isfinite().all()):
        raise ValueError(f"{m} has a running variance of -eps or less, or infinite values: its scale is not finite")
    s_r = _up(6 * u * scale.abs() + tiny)
    t_r = _up(mean.abs() * s_r + 4 * u * (product.abs() + b.abs()) + 2 * tiny)
    return _ChannelAffine(scale, b - product, _bn_dims(m), (s_r, t_r))


def _w(m, dtype):
    return m.weight.to(dtype), None if m.bias is None else m.bias.to(dtype)


def _sound_step(m, lo, hi):
    """The box after layer m, containing the exact image of [lo, hi]."""
    if isinstance(m, nn.ReLU):
        return lo.clamp(min=0), hi.clamp(min=0)
    if isinstance(m, nn.Flatten):
        return lo.flatten(1), hi.flatten(1)
    if isinstance(m, Normalize):  # std > 0: monotone; two roundings, each within half an ulp of the
        mean, std = m.mean.to(lo.dtype), m.std.to(lo.dtype)  # result, so three ulps outward cover both
        lo, hi = (lo - mean) / std, (hi - mean) / std
        for _ in range(3):
            lo, hi = _down(lo), _up(hi)
        return lo, hi
    if isinstance(m, _ChannelAffine):  # x * s + t, one term: its rounding, plus how far s and t may be off
        s_r, t_r = m.radius
        extra = m.view(s_r) * torch.maximum(lo.abs(), hi.abs()) + m.view(t_r)
        return _sound_affine(lo, hi, 1, lambda x, s, t: x * m.view(s) + (0 if t is None else m.view(t)),
                             m.scale, m.shift, extra)
    return _sound_affine(lo, hi, *_affine_parts(m), *_w(m, lo.dtype))


def _sound_elided(m, lo, hi, C):
    """IBP's last layer with C folded in: C W x + C b. W' = C W and C b are computed too; their rounding
    errs by at most gamma_k |C| (|W| |x| + |b|), with |x| <= max(|lo|, |hi|), k = classes."""
    W, b = _w(m, lo.dtype)
    xabs = torch.maximum(lo.abs(), hi.abs()).unsqueeze(-1)
    inner = W.abs() @ xabs + (0 if b is None else b.abs().unsqueeze(-1))
    extra = _gamma(C.shape[-1], lo.dtype) * (C.abs() @ inner).squeeze(-1)
    return _sound_affine(lo, hi, m.in_features, _per_example, C @ W, None if b is None else C @ b, extra)


def _underflow(n, hmax):
    """(N, 1): a bound on what underflow adds to inner products of n terms that then meet h (|h| <= hmax):
    each product or sum loses at most the smallest normal number, absolutely."""
    return 2 * (n + 1) * torch.finfo(hmax.dtype).tiny * (1 + hmax.flatten(1).sum(1, keepdim=True))


def _sound_relax(l, u):
    """_relax with an upper line valid in exact arithmetic: the slope is any float, and the intercept is
    rounded up until the line lies above relu at both ends of [l, u] (so on all of it: relu is convex)."""
    d_l, s, _ = _relax(l, u)
    t = torch.maximum(_up(-s * l), _up(u - _down(s * u)))
    return d_l, s, torch.where((l < 0) & (u > 0), t, 0)


class _Floats:
    """The ledger of plain float arithmetic: it charges nothing, takes the ReLU relaxations from the
    bounds in hand, and keeps full CROWN's float IBP chain (box: IBP from the last tightened ReLU).
    sound_bounds passes a _Ledger instead, whose every answer holds in exact arithmetic."""
    sound = False

    def __init__(self, layers=None, xl=None, xu=None):
        self.layers, self.start = layers, 0
        self.c, self.r = (None, None) if xl is None else _centre_radius(xl, xu)

    def box(self, i):
        for m in self.layers[self.start:i]:
            self.c, self.r = _ibp_layer(m, self.c, self.r)
        self.start = i
        return self.c - self.r, self.c + self.r

    def tighten(self, i, l, u):
        self.c, self.r = _centre_radius(l.clamp(min=0), u.clamp(min=0))
        self.start = i + 1

    def relax(self, i, pre):
        return _relax(*pre[i])

    def centre_radius(self, xl, xu):
        return _centre_radius(xl, xu)

    def part(self, rows):
        return self

    def begin(self, bias):
        pass

    def step(self, j, A, window=None):
        pass

    def input(self, A, v):
        pass

    def close(self, lb):
        return lb


_FLOATS = _Floats()  # the stateless one, for the passes that keep no IBP chain


class _Ledger:
    """The rounding of CROWN's backward passes (_backward, _patch_bounds, _concretize) run in floats,
    charged where it happens, for sound_bounds. A pass keeps a lower bound of row . f(x) as
    A . h + bias, h the exact input of the layer reached and A the floats held. Each step is charged
    against the box of h, which holds exactly (box: the input box, then sound IBP, intersected at each
    ReLU with the charged CROWN bounds of that ReLU, tighten):
    - Linear, Conv2d: A . (W h + b) = (A W) . h + A . b. Every entry of A W, and A . b, is an inner
      product of at most n terms (the out features; a transposed convolution's o kh kw; the layer's
      neurons), so the two err by at most gamma_n <|A|, |W| max|h| + |b|>.
    - ReLU: the lower slope is 0 or 1 (alpha-CROWN's: any float in [0, 1]), the upper line is
      _sound_relax's: A . relu(z) >= A' . z + A^- . t exactly, A' the exact product of A and the
      slopes. A' as rounded errs by u |A| entrywise, and A^- . t by gamma_n |A| t, both only at unstable
      neurons (a stable one multiplies by 0 or 1, exactly, and has t = 0): gamma_n <|A|, max|z| + t> there.
    - Normalize: A . (h - mean) / std = (A / std) . h - A . (mean / std): gamma_n <|A|, max|h| / std + |mean / std|>.
    - BatchNorm, x * s + t with s and t within (s_r, t_r) of the floats (_sound_bn): as Normalize,
      gamma_n <|A|, max|h| |s| + |t|>, plus what the floats miss, <|A|, max|h| s_r + t_r>.
    - The input box: the minimum over [c - r, c + r] (_enclose: it contains [xl, xu]) of A x is
      A c - |A| r, which errs by gamma_n <|A|, |c| + r>.
    Each step's <|A|, v> also bounds the term it adds to bias, and the K sums into bias err by at most
    gamma_K times those terms' sizes together. gamma (_gamma) has twice the room needed, which covers
    the rounding of the charges themselves; underflow: _underflow per step. close(lb) subtracts it all,
    rounded outward: a bound of row . f(x) in exact arithmetic for every x in the box."""

    sound = True

    def __init__(self, layers, xl, xu):
        self.layers, self.boxes, self.cache = layers, [(xl, xu)], {}

    def centre_radius(self, xl, xu):
        """A centre and radius whose exact box contains [xl, xu]."""
        return _enclose(xl, xu)

    def box(self, j):
        """The box of layer j's input."""
        while len(self.boxes) <= j:
            self.boxes.append(_sound_step(self.layers[len(self.boxes) - 1], *self.boxes[-1]))
        return self.boxes[j]

    def tighten(self, i, l, u):
        """ReLU i's box is [l, u] now (it must hold exactly); what was derived from the old one goes."""
        self.box(i)
        self.boxes[i + 1:], self.boxes[i] = [], (l, u)
        self.cache = {k: v for k, v in self.cache.items() if k[1] < i}

    def part(self, rows):
        """The same ledger for the examples rows (a slice) alone."""
        self.box(len(self.layers) - 1)
        part = _Ledger(self.layers, None, None)
        part.boxes = [(l[rows], u[rows]) for l, u in self.boxes]
        return part

    def relax(self, i, pre=None):
        """ReLU i's relaxation, valid exactly over its sound box (pre, the float bounds, is not used)."""
        if ("relax", i) not in self.cache:
            self.cache["relax", i] = _sound_relax(*self.box(i))
        return self.cache["relax", i]

    def _charge(self, j):
        """(v, n, underflow, w) of layer j: each step is charged gamma_n <|A|, v> + underflow + 2 <|A|, w>
        (w: how far the layer's exact values may lie from its floats, or None)."""
        if ("v", j) not in self.cache:
            m, (lo, hi) = self.layers[j], self.box(j)
            hmax, n, w = torch.maximum(lo.abs(), hi.abs()), lo[0].numel(), None
            if isinstance(m, nn.ReLU):  # a stable neuron's slopes are 0 or 1 and its intercept 0: exact
                v = torch.where((lo < 0) & (hi > 0), hmax + self.relax(j)[2], 0)
            elif isinstance(m, Normalize):
                v = hmax / m.std + (m.mean / m.std).abs()
            elif isinstance(m, _ChannelAffine):
                v = hmax * m.view(m.scale.abs()) + m.view(m.shift.abs())
                w = hmax * m.view(m.radius[0]) + m.view(m.radius[1])
            else:  # Linear, Conv2d
                W, b = m.weight, m.bias
                v = _affine_parts(m)[1](hmax.unsqueeze(0), W.abs(), None)[0]
                v = v if b is None else v + b.abs().view(-1, *[1] * (v.dim() - 2))
                k = m.out_features if isinstance(m, nn.Linear) else W.shape[0] // m.groups * math.prod(m.kernel_size)
                n = max(k, v[0].numel())
            self.cache["v", j] = v, n, _underflow(n, hmax), w
        return self.cache["v", j]

    def begin(self, bias):
        self.charge, self.size, self.k = 0, bias.detach().abs(), 1

    def _add(self, A, v, n, under, w=None):
        D = (A.detach().abs() * v).flatten(2).sum(-1)
        self.charge = self.charge + _gamma(n, A.dtype) * D + under
        self.size = self.size + D
        if w is not None:  # doubled: covers the rounding of computing and adding it (relative n u << 1)
            self.charge = self.charge + 2 * (A.detach().abs() * w).flatten(2).sum(-1)

    def step(self, j, A, window=None):
        """Charge the step back through layer j; A: the rows over its output. window(v) -> v over A's
        patches (_patch_bounds)."""
        if not isinstance(self.layers[j], nn.Flatten):
            v, n, under, w = self._charge(j)
            per_row = (lambda t: t.unsqueeze(1)) if window is None else window  # noqa: E731
            self._add(A, per_row(v), n, under, None if w is None else per_row(w))
            self.k += 1

    def input(self, A, v):
        """Charge the concretisation over the input box, v = |c| + r (or its patches)."""
        n = A[0, 0].numel()
        self._add(A, v.unsqueeze(1) if v.dim() < A.dim() else v, n, _underflow(n, v))
        self.k += 2

    def close(self, lb):
        """lb less every charge: a lower bound in exact arithmetic."""
        tiny = torch.finfo(lb.dtype).tiny
        return _down(lb - _up(self.charge + _gamma(self.k, lb.dtype) * self.size + 2 * (self.k + 1) * tiny))


# ==============================================================================================
# PART III. KERNELS: fused and hand-written steps, and the arithmetic guard
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# 11. IBP's ReLU and CROWN's ReLU step as single autograd functions, compiled when large
# ----------------------------------------------------------------------------------------------


COMPILE_MIN = int(os.environ.get("CERTMIN_COMPILE_MIN", 2 ** 22))  # elements; <= 0: never
_compiled = {}


def _fused(fn, *args):
    """Run fn compiled when its first tensor is large. torch.compile fuses an elementwise chain into
    one loop: ~6x faster than eager on CROWN's A at DM-large's size, where eager's many passes over
    150 MB tensors dominate a CROWN-IBP step. Small tensors, or a platform where compiling fails, run
    fn as it is. The chains are plain IEEE arithmetic, so both give the same numbers."""
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


def _ibp_relu_forward(c, r):
    l, u = (c - r).clamp(min=0), (c + r).clamp(min=0)
    return (u + l) / 2, (u - l) / 2


def _ibp_relu_backward(c, r, g_c, g_r):
    # autograd's own arithmetic for the forward above, term by term (so the same bits): clamp passes
    # the gradient where its input is >= 0, the halves and the sums come back through / 2, + and -
    half_c, half_r = g_c / 2, g_r / 2
    g_u = torch.where(c + r >= 0, half_c + half_r, 0)
    g_l = torch.where(c - r >= 0, half_c - half_r, 0)
    return g_u + g_l, g_u - g_l


class _IbpRelu(torch.autograd.Function):
    """IBP through a ReLU in centre/radius form: (c, r) -> the centre and radius of [relu(c - r),
    relu(c + r)]. Eager autograd runs this as 8 passes forward and 12 backward over activation-sized
    tensors (most of an IBP step's memory traffic on a GPU); written out, each direction is one fused
    loop on large tensors (_fused), with the same numbers."""

    @staticmethod
    def forward(ctx, c, r):
        ctx.save_for_backward(c, r)
        return _fused(_ibp_relu_forward, c, r)

    @staticmethod
    def backward(ctx, g_c, g_r):
        return _fused(_ibp_relu_backward, *ctx.saved_tensors, g_c, g_r)


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


# ----------------------------------------------------------------------------------------------
# 12. The IEEE-precision guard
# ----------------------------------------------------------------------------------------------


class ieee:
    """with ieee(device_type): float32 is IEEE float32 whatever the caller set: no autocast, no TF32 (cuDNN's default for
    float32 convolutions on CUDA), no bf16 inner products (set_float32_matmul_precision("medium") on
    some CPUs). These keep 7 to 10 of float32's 23 mantissa bits, and a bound computed with them is not
    a bound of the float32 network: under bf16 autocast, at eps 1e-5, about half the margins of a random
    DM-small fell outside their bounds. Outside: the caller's settings again."""

    def __init__(self, device_type):
        self.autocast = torch.autocast(device_type, enabled=False)

    def __enter__(self):
        self.autocast.__enter__()
        backends = torch.backends
        try:  # the switches train.py and most code set
            self.legacy = torch.get_float32_matmul_precision(), backends.cudnn.allow_tf32
            torch.set_float32_matmul_precision("highest")
            backends.cudnn.allow_tf32 = False
            knobs = [getattr(backends.mkldnn, "conv", None)]  # no legacy switch for this one
        except RuntimeError:  # the caller set torch's per-operator fp32_precision, which the legacy getters refuse
            self.legacy = None
            knobs = [backends.cuda.matmul, backends.cudnn.conv, backends.mkldnn.matmul, backends.mkldnn.conv]
        self.knobs = [(k, k.fp32_precision) for k in knobs if k is not None and hasattr(k, "fp32_precision")]
        for k, _ in self.knobs:
            k.fp32_precision = "ieee"

    def __exit__(self, *exc):
        for k, was in reversed(self.knobs):
            k.fp32_precision = was
        if self.legacy is not None:
            torch.set_float32_matmul_precision(self.legacy[0])
            torch.backends.cudnn.allow_tf32 = self.legacy[1]
        self.autocast.__exit__(*exc)
