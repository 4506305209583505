"""train.py: certified training with AdvIBP (Fan & Li, AAAI 2021) and its baselines.

    python train.py --dataset mnist --eps 0.3                  # the paper's preset (250 epochs)
    python train.py --dataset cifar --eps 8/255                # 3200 epochs; a GPU is picked if present
    python train.py --dataset mnist --eps 0.3 --model dm-small --epochs 20   # a short CPU run
    python train.py --dataset mnist --eps 0.3 --method ibp     # baselines: ibp, crown-ibp, pgd, natural
    python train.py ... --resume                               # continue where --out/last.pt stopped
    python train.py --dataset mnist --eps 0.3 --precision bf16 --channels-last   # the fastest measured on an H100
    torchrun --standalone --nproc_per_node=4 train.py --dataset cifar --eps 8/255   # several GPUs
    python verify.py runs/mnist-0.3/last.pt                    # then certify what it saved

Phases: natural -> adversarial warm-up (FGSM-RS, eps_adv ramps up) -> joint
(the verified eps ramps up, weights from the current batch) -> joint at full eps (bias-corrected
weights). --epochs scales every epoch number of the preset, so a short run passes through every phase.
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import pickle
import signal
import sys
import tarfile
import time
import urllib.request
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

import certmin

# ---------------------------------------------------------------------------------------------
# Presets: the paper's schedules. Epoch numbers; a run of E epochs scales all of them by E / epochs.
# ---------------------------------------------------------------------------------------------

MNIST_EPS_TRAIN = lambda eps: max(eps, 0.2 if eps <= 0.1 else 0.4)  # noqa: E731; 0.2 for eps 0.1, 0.4 for 0.2-0.4
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# c_max is in per-example FOSC units: the authors' 1e-4 and 1e-5 at batch 256 (their FOSC is a batch mean)
MNIST_C_MAX = lambda eps, eps_train: 0.00256 if eps_train <= 0.2 else 0.0256  # noqa: E731
CIFAR_C_MAX = lambda eps, eps_train: 0.00256 if eps <= 2 / 255 else 0.0256  # noqa: E731
# What both recipes share: no IBP initialisation, regulariser, gradient clipping or eps floor in the paper's
PAPER = dict(model="dm-large", init="default", reg=0.0, tau=0.5, grad_clip=0.0, eps_floor=0.0, kappa_init=1.0, lr=5e-4)

# The paper's presets. ibp_ramp: the eps ramp of --method ibp / crown-ibp (Gowal et al.: after natural training).
PRESETS = {
    "mnist": dict(PAPER, epochs=250, natural=10, adv_ramp=(10, 50), ver_ramp=(50, 100), ibp_ramp=(10, 100),
                  c_decay=(110, 159), lr_decay=(150, 200), lr_factor=0.25, kappa_final=0.5, shape=(1, 28, 28),
                  mean=None, std=None, batch_size=256, crop=None, eps_train=MNIST_EPS_TRAIN, c_max=MNIST_C_MAX),
    "cifar": dict(PAPER, epochs=3200, natural=400, adv_ramp=(400, 800), ver_ramp=(810, 1810), ibp_ramp=(400, 1810),
                  c_decay=(1829, 2108), lr_decay=(2200, 2700), lr_factor=0.1, kappa_final=0.0, shape=(3, 32, 32),
                  mean=CIFAR_MEAN, std=CIFAR_STD, batch_size=256, crop=(4, "constant"),
                  eps_train=lambda eps: 1.1 * eps, c_max=CIFAR_C_MAX),
}
# The fast recipe (Shi et al., NeurIPS 2021): CNN-7 with BatchNorm, IBP initialisation, the warm-up regularisers
# (weight reg * (1 - eps / eps_train) while eps ramps), an eps floor, gradient clipping, kappa 0, and a short
# schedule: IBP's eps ramps over epochs 1-81 of 160 on CIFAR (1-21 of 70 on MNIST; counted from 0, Shi et al.'s code
# starts both at its second epoch), the floor before. AdvIBP's three phases sit in
# the same budget: the FGSM-RS warm-up's eps ramps over the first epochs, the verified eps ramps from there to
# where IBP's ends, and the bias-corrected joint rule runs to the end, c_t decaying early in it as in the paper.
FAST = dict(model="cnn7", init="ibp", reg=0.5, tau=0.5, grad_clip=10.0, eps_floor=1e-6, kappa_init=0.0,
            kappa_final=0.0, lr=5e-4, lr_factor=0.2)
FAST_PRESETS = {
    "mnist": dict(FAST, epochs=70, natural=0, adv_ramp=(0, 6), ver_ramp=(6, 21), ibp_ramp=(1, 21), c_decay=(25, 41),
                  lr_decay=(50, 60), shape=(1, 28, 28), mean=None, std=None, batch_size=256, crop=None,
                  eps_train=MNIST_EPS_TRAIN, c_max=MNIST_C_MAX),
    "cifar": dict(FAST, epochs=160, natural=0, adv_ramp=(0, 10), ver_ramp=(10, 81), ibp_ramp=(1, 81), c_decay=(82, 98),
                  lr_decay=(120, 140), shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, batch_size=128,
                  crop=(2, "replicate"), eps_train=lambda eps: eps, c_max=CIFAR_C_MAX),
}
RECIPES = {"paper": PRESETS, "fast": FAST_PRESETS}
MODELS = {"dm-small": certmin.dm_small, "dm-medium": certmin.dm_medium, "dm-large": certmin.dm_large,
          "dm-small-bn": lambda **kw: certmin.dm_small(bn=True, **kw), "cnn7": certmin.cnn7}
METHODS = ("advibp", "advcrown-ibp", "ibp", "crown-ibp", "pgd", "natural")


def parse_eps(text):
    """'8/255', '0.3' -> float >= 0; anything else is an argparse error that says what is expected."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction like 8/255, got {text!r}")
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"eps must be finite and >= 0, got {text!r}")
    return value


def resolve(args):
    """The full configuration: the recipe's preset for (dataset, eps), scaled to --epochs, plus the options."""
    p = dict(RECIPES[args.recipe][args.dataset])
    eps_train = p.pop("eps_train")(args.eps)
    c_max = p.pop("c_max")(args.eps, eps_train)
    scale = (args.epochs or p["epochs"]) / p["epochs"]
    for k in ("natural", "adv_ramp", "ver_ramp", "ibp_ramp", "c_decay", "lr_decay"):
        p[k] = [v * scale for v in p[k]] if isinstance(p[k], tuple) else p[k] * scale
    p.update(epochs=args.epochs or p["epochs"], eps=args.eps, eps_train=eps_train, c_max=c_max, recipe=args.recipe,
             dataset=args.dataset, model=args.model or p["model"], method=args.method, weights=args.weights,
             batch_size=args.batch_size or p["batch_size"], lr=args.lr or p["lr"], seed=args.seed, val_split=args.val_split,
             train_n=args.train_n, precision=args.precision, pgd_steps=args.pgd_steps,
             channels_last=args.channels_last, clean_n=args.clean_n, pipeline=args.pipeline,
             weight_scope=args.weight_scope, data=str(Path(args.data).resolve()),  # data: where verify.py looks first
             latent_stages=args.latent_stages, latent_epochs=args.latent_epochs or args.epochs or p["epochs"])
    p["shape"], p["crop"] = list(p["shape"]), p["crop"] and list(p["crop"])
    return p


def total_epochs(cfg):
    """The schedule's epochs and those of its latent stages."""
    return cfg["epochs"] + cfg.get("latent_stages", 0) * cfg.get("latent_epochs", 0)


LATENT_LR, LATENT_DECAY = 0.25, (0.2, 0.4, 0.8)  # a stage's Adam: lr x 0.25, x 0.25 at these fractions of it


def latent_schedule(cfg, e):
    """Epoch e of the layer-wise latent stages that follow the schedule (the authors' code): stage k
    freezes the first k affine layers and attacks inside the IBP box of layer k's input; both eps full,
    c_t 0, a fresh Adam at lr / 4 decayed x 0.25 at 20, 40 and 80% of the stage."""
    n, et = cfg["latent_epochs"], cfg["eps_train"]
    stage = min(int((e - cfg["epochs"]) // n), cfg["latent_stages"] - 1)
    t = e - cfg["epochs"] - stage * n
    lr = cfg["lr"] * LATENT_LR * LATENT_LR ** sum(t >= f * n for f in LATENT_DECAY)
    return dict(eps_adv=et, eps_ver=et, beta=0.0, kappa=0.0, c_t=0.0, lr=lr, final=True, phase="latent",
                stage=stage + 1, reg=0.0)


def schedule(cfg, e):
    """Everything that changes during training, at fractional epoch e."""
    if e >= cfg["epochs"] and cfg.get("latent_stages"):
        return latent_schedule(cfg, e)
    (a0, a1), (v0, v1), (c0, c1) = cfg["adv_ramp"], cfg["ver_ramp"], cfg["c_decay"]
    et, method = cfg["eps_train"], cfg["method"]
    s = dict(eps_adv=certmin.smooth_ramp(e, a0, a1 - a0, et), eps_ver=certmin.smooth_ramp(e, v0, v1 - v0, et),
             beta=0.0, kappa=0.0, c_t=certmin.linear_ramp(e, c0, c1 - c0, 0.0, init=cfg["c_max"]),
             lr=cfg["lr"] * cfg["lr_factor"] ** sum(e >= d for d in cfg["lr_decay"]), final=e >= v1, stage=0)
    if method in ("advcrown-ibp", "crown-ibp"):
        s["beta"] = certmin.linear_ramp(e, v0, v1 - v0, 0.0, init=1.0)
    if method in ("ibp", "crown-ibp"):  # Gowal / Zhang: one eps ramp after natural training
        n, end = cfg.get("ibp_ramp") or (cfg["natural"], v1)
        s["eps_ver"] = certmin.smooth_ramp(e, n, end - n, et)
        s["kappa"] = certmin.linear_ramp(e, n, end - n, cfg["kappa_final"], init=cfg.get("kappa_init", 1.0))
        s["beta"] = certmin.linear_ramp(e, n, end - n, 0.0, init=1.0) if method == "crown-ibp" else 0.0
    s["eps_ver"] = max(s["eps_ver"], cfg.get("eps_floor", 0.0))
    # the warm-up regularisers' weight: while the verified eps ramps up, fading as it grows
    s["reg"] = cfg.get("reg", 0.0) * (1 - s["eps_ver"] / et if et > 0 else 1.0) if not s["final"] else 0.0
    released = cfg.get("pipeline") == "released" and method in ("advibp", "advcrown-ibp")
    if released:  # the authors' released code: no attack before the final eps, L_ver alone through the ramp
        s["eps_adv"] = s["eps_adv"] if e >= v1 else 0.0
    if method == "natural" or e < cfg["natural"] or (released and e < v0):
        s["phase"] = "natural"
    elif released and e < v1:
        s["phase"] = "ver-ramp"
    elif method in ("advibp", "advcrown-ibp"):
        s["phase"] = "adv-warmup" if e < v0 else ("joint" if e < v1 else "joint-final")
    else:
        s["phase"] = method if e < v1 else method + "-final"
    return s


# ---------------------------------------------------------------------------------------------
# Data, without torchvision: the original files, found in --data or downloaded and checked.
# ---------------------------------------------------------------------------------------------

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
               "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
               "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
               "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


class DataError(Exception):
    """Bad input or a failed write: main() prints it as one error: line, exit status 1."""


class Refused(DataError):
    """A run refused before anything is read or trained (output folder, resume options): exit status 2."""


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url, dest, md5):
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"downloading {url}", file=sys.stderr, flush=True)
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)
    if _md5(tmp) != md5:
        tmp.unlink()
        raise DataError(f"{url} arrived with a wrong checksum (expected md5 {md5}); try again")
    tmp.replace(dest)


def _find(root, candidates, names):
    for d in candidates:
        if all((root / d / n).exists() for n in names):
            return root / d
    return None


MNIST_SPLITS = {"train": 60000, "t10k": 10000}  # images per split: any other count is a damaged file
CIFAR_BATCH = 10000  # images per CIFAR batch file


def _damaged(path, what):
    return DataError(f"{path} is damaged ({what}); delete it to download it again, or replace it with the original")


def _read_idx(path, magic, shape):
    """One MNIST IDX file (gzipped or not) as uint8 (N, *shape), its header checked against its bytes."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise _damaged(path, f"{type(err).__name__}: {err}")
    head = 4 * (1 + len(shape))
    if len(data) < head or int.from_bytes(data[:4], "big") != magic:
        raise _damaged(path, f"not an IDX file with magic number {magic}")
    dims = [int.from_bytes(data[4 * i:4 * i + 4], "big") for i in range(1, 1 + len(shape))]
    if dims[1:] != list(shape[1:]):
        raise _damaged(path, f"its header gives item shape {dims[1:]}, MNIST's is {list(shape[1:])}")
    if len(data) - head != math.prod(dims):
        raise _damaged(path, f"its header promises {dims[0]} items, the file holds {len(data) - head} bytes of "
                             f"the {math.prod(dims)} they need")
    return torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8).view(*dims)


def load_mnist(root, download=True, splits=("train", "t10k")):
    root = Path(root)
    dirs = [".", "mnist", "MNIST/raw"]
    wanted = [n for n in MNIST_FILES if n.split("-")[0] in splits]
    found = _find(root, dirs, wanted) or _find(root, dirs, [n[:-3] for n in wanted])
    if found is None and download:
        try:
            for name in wanted:
                _download(MNIST_URL + name, root / "mnist" / name, MNIST_FILES[name])
            found = root / "mnist"
        except OSError as err:
            print(f"download failed: {err}", file=sys.stderr)
    if found is None:
        raise DataError(f"MNIST not found under {root} and it could not be downloaded. Put the files "
                        f"{', '.join(wanted)} (or the same without .gz) in {root / 'mnist'} "
                        f"(or MNIST/raw, as torchvision does), or pass --data DIR.")
    out = []
    for split in splits:
        paths = [found / f"{split}-{kind}-idx{k}-ubyte.gz" for kind, k in (("images", 3), ("labels", 1))]
        paths = [p if p.exists() else p.with_suffix("") for p in paths]
        x = _read_idx(paths[0], 2051, (None, 28, 28)).unsqueeze(1)
        y = _read_idx(paths[1], 2049, (None,)).long()
        for p, n in ((paths[0], len(x)), (paths[1], len(y))):
            if n != MNIST_SPLITS[split]:
                raise _damaged(p, f"{n} items where MNIST's {split} split has {MNIST_SPLITS[split]}; to train on "
                                  f"fewer images on purpose, keep the whole file and pass --train-n")
        out += [x, y]
    return out


def load_cifar(root, download=True, splits=("train", "test")):
    root = Path(root)
    names = [n for n in CIFAR_FILES if ("test" in n) == ("test" in splits)] if len(splits) == 1 else CIFAR_FILES
    dirs = ["cifar-10-batches-py", "cifar10/cifar-10-batches-py", "."]
    found = _find(root, dirs, names)
    if found is None and download:
        try:
            archive = root / "cifar-10-python.tar.gz"
            _download(CIFAR_URL, archive, CIFAR_MD5)
            with tarfile.open(archive) as t:
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
                t.extractall(root, **safe)
            found = _find(root, dirs, names)
        except (OSError, tarfile.TarError) as err:
            print(f"download failed: {err}", file=sys.stderr)
    if found is None:
        raise DataError(f"CIFAR-10 not found under {root} and it could not be downloaded. Put the python "
                        f"version's batches ({', '.join(names)}) in {root / 'cifar-10-batches-py'}, "
                        f"or pass --data DIR.")

    def read_batch(path):
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            data, labels = d["data"], d["labels"]
            # the bytes, not the array: torch built against NumPy 1.x (< 2.3) cannot read NumPy 2's arrays
            x = torch.frombuffer(bytearray(data.tobytes()), dtype=torch.uint8)
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, AttributeError, ValueError) as err:
            raise _damaged(path, f"{type(err).__name__}: {str(err)[:120]}")
        if len(x) != CIFAR_BATCH * 3 * 32 * 32 or len(labels) != CIFAR_BATCH:
            raise _damaged(path, f"{len(x)} bytes of images and {len(labels)} labels where a CIFAR-10 batch holds "
                                 f"{CIFAR_BATCH} of each")
        return x.view(-1, 3, 32, 32), torch.tensor(labels).long()

    out = []
    for group in ([n for n in names if "test" not in n], [n for n in names if "test" in n]):
        if group:
            xs, ys = zip(*(read_batch(found / n) for n in group))
            out += [torch.cat(xs), torch.cat(ys)]
    return out


def load_data(dataset, root, download=True, test_only=False):
    """(x_train, y_train, x_test, y_test): uint8 images (N, C, H, W) and int64 labels; with test_only,
    (x_test, y_test), and the training files are never read."""
    if dataset == "mnist":
        return load_mnist(root, download, ("t10k",) if test_only else ("train", "t10k"))
    return load_cifar(root, download, ("test",) if test_only else ("train", "test"))


def augment(x, pad=4, mode="constant"):
    """CIFAR's random crop (the image's size, from the image padded by pad pixels: zeros, or with mode
    "replicate" its edge pixels) and horizontal flip, as tensor ops on the batch's device."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode=mode)
    oy, ox = torch.randint(0, 2 * pad + 1, (2, n, 1), device=x.device)
    rows = (oy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    flip = torch.rand(n, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def build_model(cfg):
    c, side, _ = cfg["shape"]
    model = MODELS[cfg["model"]](in_ch=c, side=side, mean=cfg["mean"], std=cfg["std"])
    return certmin.ibp_init(model) if cfg.get("init") == "ibp" else model


# ---------------------------------------------------------------------------------------------
# Evaluation (clean and IBP-verified error; verify.py does the full job)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, x, y, eps, batch_size=500):
    wrong = unverified = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].float() / 255, y[i:i + batch_size]
        wrong += (model(xb).argmax(1) != yb).sum().item()
        unverified += (~certmin.verified_loss(model, xb, yb, eps)[1]).sum().item()
    return wrong / len(y), unverified / len(y)


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, everything needed to resume exactly
# ---------------------------------------------------------------------------------------------


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash or a failed write (disk full, permissions) leaves
    the old file whole; the failure is a DataError that says so."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # a crash leaves either the old file or the new one, never half of one
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise DataError(f"could not save {path} ({str(err).splitlines()[0][:200]}); {kept}. Free space or fix the "
                        "folder's permissions, then continue with --resume")


def load_checkpoint(path):
    """A train.py checkpoint as a dict, or a DataError saying why not. Data only: weights_only."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; name its checkpoint, e.g. {path / 'last.pt'}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"no checkpoint at {path}")
    except Exception as err:  # torch's own message may advise weights_only=False: unsafe for a file of unknown origin
        raise DataError(f"{path} is not a readable checkpoint ({type(err).__name__}): it may be truncated, or not "
                        f"written by train.py. {NOT_OURS}")
    if not isinstance(ck, dict) or not {"model", "config"} <= set(ck):
        raise DataError(f"{path} is not a train.py checkpoint (no 'model' and 'config' entries). {NOT_OURS}")
    return ck


NOT_OURS = ("To certify a model of your own, call the library on it: certmin.sound_bounds(model, xl, xu, C, 'ibp') "
            "with certmin.input_box and certmin.margin_spec (README, 'The library')")


# ---------------------------------------------------------------------------------------------
# One training step per phase. Each takes a batch and the schedule s and returns the loss to
# minimise (for AdvIBP once the verified term is on: the pair that TwoGradient weights, and FOSC)
# and the figures to log, as tensors, read once per epoch.
# ---------------------------------------------------------------------------------------------


# The labels were checked once (train) and every x lies in [0, 1], so the steps skip verified_loss's
# input checks (check=False): each would make the host wait for the GPU once per step.
# BatchNorm: the clean batch sets the statistics (certmin.batch_stats, the one pass that updates the running
# ones), which the bounds and the adversarial loss share; attacks run BatchNorm in eval mode. Without
# BatchNorm, stats is {} and every call below is the plain one.


def clean_net(model, stats):
    """The network a step trains: the model, with the clean batch's BatchNorm statistics."""
    return (lambda z: certmin.forward(model, z, stats)) if stats else model


def verified_term(model, x, y, s, cfg, stats):
    """(the verified loss plus, while eps ramps up with the fast recipe, the warm-up regularisers, weighted;
    figures)."""
    pre = {} if cfg.get("reg") and not s["final"] else None
    loss_ver, verified = certmin.verified_loss(model, x, y, s["eps_ver"], beta=s["beta"], check=False, stats=stats,
                                               pre=pre)
    figures = {"loss_ver": loss_ver.detach(), "ver_wrong": (~verified).float().mean()}
    if pre is None:
        return loss_ver, figures
    tight, relu = certmin.warmup_loss(pre, *certmin.input_box(x, s["eps_ver"]), cfg["tau"], model)
    figures.update(reg_tight=tight.detach(), reg_relu=relu.detach())
    return loss_ver + s["reg"] * (tight + relu), figures


def natural_step(model, x, y, s, cfg):
    """Cross-entropy on clean inputs."""
    logits = model(x)
    return F.cross_entropy(logits, y), {"clean_wrong": (logits.argmax(1) != y).float().mean()}


def pgd_step(model, x, y, s, cfg):
    """Madry et al.: cross-entropy at a PGD point of the eps_adv ball."""
    stats = certmin.batch_stats(model, x)
    with certmin.bn_eval(model):
        xa = certmin.pgd(model, x, y, s["eps_adv"], steps=cfg["pgd_steps"], step_size=2.5 * s["eps_adv"] / cfg["pgd_steps"])
    logits = clean_net(model, stats)(xa)
    loss = F.cross_entropy(logits, y)
    return loss, {"loss_adv": loss.detach(), "adv_wrong": (logits.argmax(1) != y).float().mean()}


def bound_step(model, x, y, s, cfg):
    """IBP (Gowal et al.) or CROWN-IBP (Zhang et al.): kappa * clean CE + (1 - kappa) * verified loss (the
    fast recipe: kappa 0, and no clean pass for it)."""
    stats = certmin.batch_stats(model, x)
    loss_ver, figures = verified_term(model, x, y, s, cfg, stats)
    if not (cfg.get("kappa_init", 1.0) or cfg["kappa_final"]):
        return loss_ver, figures
    return s["kappa"] * F.cross_entropy(clean_net(model, stats)(x), y) + (1 - s["kappa"]) * loss_ver, figures


def advibp_step(model, x, y, s, cfg):
    """AdvIBP: the adversarial loss at an FGSM-RS point; in the warm-up that loss alone, from the joint
    phase on also its FOSC and the verified loss, as (loss_adv, loss_ver, fosc, grad_adv) for
    TwoGradient, with L_adv's parameter gradient and FOSC's input gradient from one backward pass."""
    stats = certmin.batch_stats(model, x)
    with certmin.bn_eval(model):
        xa = certmin.fgsm_rs(model, x, y, s["eps_adv"])
    net = clean_net(model, stats)
    if s["phase"] == "adv-warmup":  # FOSC serves TwoGradient only: not computed here
        logits = net(xa)
        loss_adv = F.cross_entropy(logits, y)
        return loss_adv, {"loss_adv": loss_adv.detach(), "adv_wrong": (logits.detach().argmax(1) != y).float().mean()}
    params = [p for p in model.parameters() if p.requires_grad]
    loss_adv, fosc, wrong, grad_adv = certmin.adv_loss_and_fosc(net, xa, x, y, s["eps_adv"], params=params,
                                                                retain_graph=bool(stats))
    loss_ver, figures = verified_term(model, x, y, s, cfg, stats)
    figures.update(loss_adv=loss_adv, adv_wrong=wrong.float().mean())
    return (loss_adv, loss_ver, fosc, grad_adv), figures


def affine_layers(model):
    """Indices of the Linear and Conv2d layers in a flat Sequential: the latent stages' layers."""
    return [i for i, m in enumerate(model) if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def latent_box(model, k, x, eps):
    """(centre, radius) of the IBP box of model[k]'s input over the eps-box of x."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        lb, ub = certmin.bounds(model[:k], *certmin.input_box(x, eps))
    return (ub + lb) / 2, (ub - lb) / 2


def latent_step(model, x, y, s, cfg):
    """A latent stage's AdvIBP step: the adversarial term is FGSM-RS inside the IBP box of the stage
    layer's input (from the box's centre, unclipped; a COLT-like adversary over a superset of what the
    eps-box reaches), the loss of the layers from there on; the verified term is IBP from the input."""
    k = affine_layers(model)[s["stage"]]
    c, r = latent_box(model, k, x, s["eps_ver"])
    tail = model[k:]
    z = certmin.fgsm_rs(tail, c, y, r, lo=-math.inf, hi=math.inf)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_adv, fosc, wrong, grad_adv = certmin.adv_loss_and_fosc(tail, z, c, y, r, -math.inf, math.inf, params=params)
    loss_ver, verified = certmin.verified_loss(model, x, y, s["eps_ver"], beta=s["beta"], check=False)
    figures = {"loss_adv": loss_adv, "adv_wrong": wrong.float().mean(), "loss_ver": loss_ver.detach(),
               "ver_wrong": (~verified).float().mean()}
    return (loss_adv, loss_ver, fosc, grad_adv), figures


def step_function(method, phase):
    if phase == "natural":
        return natural_step
    if phase == "ver-ramp":  # the released pipeline's ramp: the verified loss alone (kappa 0)
        return bound_step
    if phase == "latent":
        return latent_step
    return {"pgd": pgd_step, "ibp": bound_step, "crown-ibp": bound_step}.get(method, advibp_step)


# ---------------------------------------------------------------------------------------------
# The collapse guard. At short budgets AdvIBP can fall into the constant classifier (results/README.md,
# "The collapse"): every margin bound 0, verified loss ln(classes), clean error 1 - 1/classes.
# ---------------------------------------------------------------------------------------------

COLLAPSE_LOW, COLLAPSE_JUMP = 0.4, 0.4  # below chance by this much counts as "was low"; a one-epoch rise


def collapse_reason(err, history, classes):
    """Why this epoch's train clean error `err` is a collapse, given the earlier epochs' errors, or None."""
    chance = 1 - 1 / classes
    best = min(history, default=1.0)
    if err >= chance - 0.05 and best <= chance - COLLAPSE_LOW:
        return f"train clean error {err:.3f} is at chance ({chance:.2f}) after reaching {best:.3f}"
    if history and err - history[-1] >= COLLAPSE_JUMP:
        return f"train clean error rose from {history[-1]:.3f} to {err:.3f} in one epoch"
    return None


# ---------------------------------------------------------------------------------------------
# The fast CUDA step: figures summed on the device, the precision of the training losses, and
# CUDA graphs. A step launches ~600 kernels from Python; it must never wait for the GPU, and under
# CUDA graphs it launches them all at once. Then the arithmetic is what is left (results/README.md, "CUDA").
# ---------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "tf32", "bf16")


def set_precision(precision):
    """TF32 matmuls and convolutions for the training losses (tf32, bf16), or exact float32 (fp32).
    Certificates never use this: evaluate() and verify.py run inside certmin.ieee, IEEE float32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"


class Tally:
    """Per-epoch sums of the step figures (FIGURES) and the first step with a non-finite loss, kept on
    the device and updated in place: a CUDA graph can replay them, and the host reads them once per
    epoch instead of once per step."""

    def __init__(self, device, step):
        self.sum = torch.zeros(len(FIGURES), dtype=torch.float64, device=device)
        self.n = torch.zeros_like(self.sum)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.step = torch.full((), step, dtype=torch.long, device=device)  # counts on the device
        self.index = {}

    def add(self, rec, finite):
        self.first_bad.copy_(torch.where(finite | (self.first_bad >= 0), self.first_bad, self.step))
        self.step += 1
        keys = tuple(k for k in FIGURES if k in rec)
        if keys not in self.index:  # once per phase, before any capture: a host-to-device copy
            self.index[keys] = torch.tensor([FIGURES.index(k) for k in keys], device=self.sum.device)
        values = torch.stack([rec[k].detach().to(torch.float64) for k in keys])
        self.sum.index_add_(0, self.index[keys], values)
        self.n.index_add_(0, self.index[keys], torch.ones_like(values))

    def means(self):
        """{figure: mean over this epoch's steps (nan if none had it)}; then start the next epoch."""
        out = dict(zip(FIGURES, (self.sum / self.n).tolist()))
        self.sum.zero_()
        self.n.zero_()
        return out


class GraphedStep:
    """--cuda-graphs: a step replays a CUDA graph of everything it does (attack, both losses, both
    gradients, TwoGradient's weights, Adam) instead of launching ~600 kernels one by one.

    One graph per phase. Schedule values that change within a phase (DYNAMIC) live in device scalars,
    filled before each replay; the others (phase, beta, final) and the shape of TwoGradient's state
    select the graph. A graph is captured after WARMUP eager steps with the same selection;
    selections that keep changing (beta in advcrown-ibp's ramp) stay eager, so does everything past
    MAX_GRAPHS graphs, and a step that fails to capture warns and stays eager. Eager steps and
    captures run on a side stream, as torch.cuda.graph asks. With capture=False (the CPU, in tests)
    every step is eager but takes the same path, the schedule as tensors; `captured` lists the
    phases captured (or, with capture=False, that would have been)."""
    DYNAMIC = ("eps_adv", "eps_ver", "c_t", "lr", "kappa", "reg")
    WARMUP, MAX_GRAPHS = 3, 6
    DRY_RUN = False  # tests: allow capture=False through train.py on the CPU

    def __init__(self, body, device, structure, capture=True):
        self.body, self.structure, self.capture = body, structure, capture
        self.values = {k: torch.zeros((), dtype=torch.float64, device=device) for k in self.DYNAMIC}
        self.x = self.y = None
        self.graphs, self.seen, self.captured = {}, {}, []  # graphs[key]: a graph, or None: stays eager
        self.stream = torch.cuda.Stream(device) if capture else None

    def __call__(self, x, y, s):
        for k, t in self.values.items():
            t.fill_(s[k])  # a kernel with the value as its argument: no copy from the host, no wait
        s = {**s, **self.values}
        key = (tuple(sorted((k, v) for k, v in s.items() if k not in self.DYNAMIC)), self.structure())
        if key in self.graphs and self.graphs[key] is None:
            return self._eager(x, y, s)
        graph = self.graphs.get(key)
        if graph is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= self.WARMUP or len(self.graphs) >= self.MAX_GRAPHS:
                return self._eager(x, y, s)
            self.captured.append(s["phase"])
            self.graphs[key] = None
            if not self.capture:
                return self._eager(x, y, s)
            self.x, self.y = x.clone(), y.clone()
            graph = torch.cuda.CUDAGraph()
            self.stream.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.graph(graph, stream=self.stream):  # records the step; runs nothing
                    self.body(self.x, self.y, s)
            except RuntimeError as err:  # the step stays eager for this selection: slower, still right
                print(f"warning: CUDA graph capture failed in phase {s['phase']} ({str(err)[:300]}); "
                      "that phase runs eagerly", file=sys.stderr, flush=True)
                torch.cuda.synchronize()
                return self._eager(x, y, s)
            self.graphs[key] = graph
        self.x.copy_(x)
        self.y.copy_(y)
        graph.replay()
        return {}

    def _eager(self, x, y, s):
        if not self.capture:
            return self.body(x, y, s)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            rec = self.body(x, y, s)
        torch.cuda.current_stream().wait_stream(self.stream)
        return rec


def make_optimizer(model, cfg, device, graphs=False):
    """Adam. On CUDA in one fused kernel; under CUDA graphs capturable (its step count and a tensor
    learning rate on the device). On the CPU the plain loop, whose results the recorded CPU runs were made with."""
    kind = ({"capturable": True} if graphs else {"fused": True}) if device.type == "cuda" else {"foreach": False}
    return torch.optim.Adam(model.parameters(), lr=cfg["lr"], **kind)


def build_step(model, opt, tg, cfg, device, dist, graphs=False, start_step=0, capture=None):
    """(run_step, tally): run_step(x, y, s) takes one training step on batch (x, y) with schedule s
    (under graphs it returns no figures; all of them are in the tally). capture=False: the graphs'
    path without capturing (default: capture on CUDA)."""
    amp = cfg["precision"] == "bf16"  # on the CPU too: slow there, but it shows what bf16 does to training
    tally = Tally(device, start_step)

    def body(x, y, s):
        """One training step, from batch and schedule to updated weights; figures go to the tally."""
        for g in opt.param_groups:
            g["lr"] = s["lr"]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=not graphs):
            loss, rec = step_function(cfg["method"], s["phase"])(model, x, y, s, cfg)
        two = isinstance(loss, tuple)  # AdvIBP's pair of losses, weighted by TwoGradient
        finite = torch.stack([t.detach().float() for t in (loss[:2] if two else (loss,))]).isfinite().all()
        if two:
            loss_adv, loss_ver, fosc, grad_adv = loss
            rec.update(tg.step(loss_adv, loss_ver, fosc=fosc, c_t=s["c_t"], final=s["final"], grad_adv=grad_adv))
        else:
            loss.backward()
            dist.mean_([p.grad for p in model.parameters()])
        if cfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg["grad_clip"])
        opt.step()
        if s["phase"] != "natural":  # after the step: a no-grad forward, on the first clean_n examples
            n = cfg.get("clean_n") or len(y)
            with torch.no_grad(), certmin.bn_eval(model):
                rec["clean_wrong"] = (model(x[:n]).argmax(1) != y[:n]).float().mean()
        tally.add(rec, finite)
        return rec

    if not graphs:
        return body, tally
    structure = lambda: (tg.was_final, tg.m_a is None, tg.pending is None)  # noqa: E731; what a graph bakes in
    capture = device.type == "cuda" if capture is None else capture
    return GraphedStep(body, device, structure, capture=capture), tally


def make_two_gradient(model, cfg, dist):
    """The two-gradient rule over the parameters that train (a latent stage freezes some)."""
    return certmin.TwoGradient(model.parameters(), mode=cfg["weights"], group=dist.group,
                               scope=cfg.get("weight_scope", "full"))


def prepare_training(cfg, device, dist, graphs=False):
    """(model, optimizer, TwoGradient) on the device, in the memory format and arithmetic that cfg
    asks for: where train() and bench.py's step benchmark both start."""
    model = build_model(cfg).to(device)
    if cfg["channels_last"]:  # NHWC activations: cuDNN's tensor-core kernels need no layout transposes
        model = model.to(memory_format=torch.channels_last)
    if dist.world > 1:  # same start on every rank
        dist.mean_([p.data for p in model.parameters()])
    if device.type == "cuda":
        set_precision(cfg["precision"])
        # the fastest convolution algorithm per shape, chosen once (2% of a step on the H100), unless
        # deterministic algorithms were asked for
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.deterministic
    opt = make_optimizer(model, cfg, device, graphs)
    tg = make_two_gradient(model, cfg, dist)
    return model, opt, tg


# ---------------------------------------------------------------------------------------------
# Training: set-up, then a loop that owns the schedule, logging, evaluation and checkpoints
# ---------------------------------------------------------------------------------------------

COLUMNS = [("epoch", "5d"), ("phase", "11s"), ("eps_adv", "7.4f"), ("eps_ver", "7.4f"), ("beta", "5.2f"),
           ("c_t", "7.5f"), ("k_adv", "7.3f"), ("k_ver", "7.3f"), ("conflict", "8.2f"), ("loss_adv", "8.4f"),
           ("loss_ver", "8.4f"), ("clean_err", "9.4f"), ("adv_err", "7.4f"), ("ver_err", "7.4f"), ("seconds", "7.1f")]
FIGURES = ["k_adv", "k_ver", "conflict", "loss_adv", "loss_ver", "clean_wrong", "adv_wrong", "ver_wrong", "reg_tight",
           "reg_relu"]


def row(rec):
    cells = []
    for name, fmt in COLUMNS:
        v = rec.get(name)
        width = int(fmt.split(".")[0].rstrip("dsf"))
        if v is None or (isinstance(v, float) and math.isnan(v)):
            cells.append(f"{'-':>{width}}")
        elif fmt.endswith("d") and not isinstance(v, int):  # an epoch cut short by Ctrl-C
            cells.append(format(v, f"{width}.2f"))
        else:
            cells.append(format(v, fmt))
    return " ".join(cells)


def header():
    return " ".join(f"{n:>{int(f.split('.')[0].rstrip('dsf'))}}" for n, f in COLUMNS)


def duration(seconds):
    """12s, 7m, 3.2h, 41.0d: a time left, at a glance."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f}{unit}" if unit != "m" else f"{seconds / size:.0f}m"
    return f"{seconds:.0f}s"


class Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.group = None
        if self.world > 1:
            import torch.distributed as dist
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.group = dist.group.WORLD

    def mean_(self, tensors):
        if self.group is not None:
            import torch.distributed as dist
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def sum(self, values):
        t = torch.tensor(values, dtype=torch.float64)
        if self.group is not None:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t.tolist()


def setup_data(cfg, args, device):
    """The training, test and (with --val-split) validation images, uint8 on the device, once: no loader
    workers, no copies at evaluation time."""
    x_train, y_train, x_test, y_test = load_data(cfg["dataset"], args.data, download=not args.no_download)
    if cfg["train_n"]:
        x_train, y_train = x_train[:cfg["train_n"]], y_train[:cfg["train_n"]]
    if args.test_n:
        x_test, y_test = x_test[:args.test_n], y_test[:args.test_n]
    val = None
    if cfg["val_split"]:  # hold out a seeded random subset of the training set for selection
        perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(cfg["seed"]))
        v, keep = perm[:cfg["val_split"]], perm[cfg["val_split"]:]
        val = (x_train[v].to(device), y_train[v].to(device))
        x_train, y_train = x_train[keep], y_train[keep]
    return (x_train.to(device), y_train.to(device)), (x_test.to(device), y_test.to(device)), val


# ---------------------------------------------------------------------------------------------
# The output folder: checked before anything is trained; a run in it is never overwritten by accident
# ---------------------------------------------------------------------------------------------

RUN_FILES = ("last.pt", "best.pt", "collapsed.pt", "log.jsonl")  # what --overwrite removes
# The options that define a run: a --resume that names one with another value than the checkpoint's is refused
RUN_OPTIONS = ("dataset", "eps", "recipe", "model", "method", "weights", "pipeline", "weight_scope", "latent_stages",
               "latent_epochs", "epochs", "batch_size",
               "lr", "seed", "val_split", "train_n", "precision", "pgd_steps", "channels_last", "clean_n")


def describe_run(out):
    """'epoch 3 of 20 (step 702), advibp dm-small on mnist eps 0.3': what a run folder holds."""
    for name in ("last.pt", "collapsed.pt"):
        if (out / name).exists():
            try:
                ck = load_checkpoint(out / name)
                c = ck["config"]
                return (f"{name} at epoch {ck['epoch']} of {total_epochs(c)} (step {ck['step']}), {c['method']} "
                        f"{c['model']} on {c['dataset']} eps {c['eps']:.4f}")
            except (DataError, KeyError):
                return f"{name}, unreadable"
    return "a log.jsonl without a checkpoint"


def prepare_output(out, args, master):
    """Create --out and prove it writable (one DataError naming the path and the cause otherwise); refuse
    a folder that holds a run unless --resume or --overwrite says what to do with it."""
    existing = [n for n in RUN_FILES if (out / n).exists()] if out.is_dir() else []
    if args.resume and not (out / "last.pt").exists():
        raise Refused(f"--resume: no checkpoint at {out / 'last.pt'}; to start a new run there, drop --resume")
    if existing and not args.resume and not args.overwrite:
        raise Refused(f"{out} already holds a run ({describe_run(out)}). Continue it with --resume, write to "
                        f"another --out, or pass --overwrite to delete its {', '.join(existing)} and start again")
    if not master:
        return
    probe = out / ".certmin-write-test"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"certmin")
        probe.unlink()
    except OSError as err:
        cause = "it is a file" if isinstance(err, FileExistsError) else (err.strerror or type(err).__name__)
        raise Refused(f"cannot write the output folder {out}: {cause} ({err.filename or out}); pick another --out")
    if args.overwrite and not args.resume:
        for name in existing:
            (out / name).unlink()


EXTENSIONS = ("latent_stages", "latent_epochs")  # may be added to a run that has not entered its latent stages


def check_resume(args, cfg, saved, epoch):
    """The config a resumed run continues with: its checkpoint's. An option given on the command line that
    differs from it is refused, by name (run-time options such as --eval-every or --data may change), but
    for latent stages added to a run at `epoch` that has not begun its own."""
    extend = epoch <= saved["epochs"] and saved.get("method") in ("advibp", "advcrown-ibp")
    clash = [(k, cfg[k], saved.get(k)) for k in RUN_OPTIONS if k in args.given and k in saved
             and not (cfg[k] == saved[k] or isinstance(cfg[k], float) and math.isclose(cfg[k], saved[k]))
             and not (extend and k in EXTENSIONS)]
    if clash:
        said = ", ".join(f"--{k.replace('_', '-')} {new} (the checkpoint has {old})" for k, new, old in clash)
        raise Refused(f"--resume continues the run as it was started, but the command line asks for {said}; "
                      "drop those options to resume, or start a new run in another --out")
    return {**saved, **{k: cfg[k] for k in EXTENSIONS if extend and k in args.given}}


# ---------------------------------------------------------------------------------------------
# Progress: the pace of the steps this process ran, and the phases still ahead
# ---------------------------------------------------------------------------------------------

# Step cost relative to a natural step, measured for CIFAR DM-large on an H200 (bf16): what the estimate
# assumes for a phase this process has not run yet. A bound-only step is about an IBP forward and backward.
PHASE_COST = {"natural": 1.0, "adv-warmup": 1.9, "joint": 3.7, "joint-final": 4.0, "pgd": 3.0, "pgd-final": 3.0}
BOUND_COST = 2.0


class Progress:
    """Per-phase seconds per step, from the steps this process ran (a resumed run's earlier steps do not
    count), and the run's time left: measured paces for the phases seen, PHASE_COST ratios for the rest."""

    def __init__(self, cfg, spe, every):
        self.cfg, self.spe, self.every = cfg, spe, every
        self.pace, self.last, self.last_step = {}, time.time(), None

    def tick(self, step, phase):
        """Call after each step; prints a line every `every` seconds within an epoch."""
        now = time.time()
        if self.last_step is None or now - self.last < self.every or not step % self.spe:
            if self.last_step is None:
                self.last, self.last_step = now, step
            return
        self.pace[phase] = (now - self.last) / (step - self.last_step)
        self.last, self.last_step = now, step
        epoch_left = self.pace[phase] * (self.spe - step % self.spe)
        left, assumed = self.time_left(step, phase)
        note = f" (assumed for phases not yet run here: {', '.join(assumed)})" if assumed else ""
        print(f"  epoch {step // self.spe + 1}: step {step % self.spe}/{self.spe}; {phase} at "
              f"{self.pace[phase]:.3f} s/step: the epoch ends in {duration(epoch_left)} and the run in "
              f"{duration(left)}{note}", file=sys.stderr, flush=True)

    def reset(self):  # after an epoch's end: evaluation and saving are not steps
        self.last, self.last_step = time.time(), None

    def time_left(self, step, phase):
        """Seconds left, from the measured paces and PHASE_COST for the phases not run here, and those assumptions."""
        rel = lambda p: PHASE_COST.get(p, BOUND_COST) / PHASE_COST.get(phase, BOUND_COST)  # noqa: E731
        pace = lambda p: self.pace.get(p, self.pace[phase] * rel(p))  # noqa: E731
        counts = {phase: self.spe - step % self.spe}
        for e in range(step // self.spe + 1, total_epochs(self.cfg)):
            p = schedule(self.cfg, e + 0.5)["phase"]
            counts[p] = counts.get(p, 0) + self.spe
        assumed = [f"{p} {pace(p):.3f} s/step" for p in counts if p not in self.pace]
        return sum(n * pace(p) for p, n in counts.items()), assumed


# ---------------------------------------------------------------------------------------------
# Training: a Run holds the state; train() is the loop
# ---------------------------------------------------------------------------------------------

def strict_json(obj, **kw):
    """One JSON text that strict parsers accept: non-finite floats become null (json.dumps writes NaN)."""
    clean = lambda v: (None if isinstance(v, float) and not math.isfinite(v) else  # noqa: E731
                       {k: clean(x) for k, x in v.items()} if isinstance(v, dict) else
                       [clean(x) for x in v] if isinstance(v, (list, tuple)) else v)
    return json.dumps(clean(obj), allow_nan=False, **kw)


class Run:
    """Everything a training run holds: config, data, model and optimiser, where it saves, how far it is."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device if args.device != "auto" else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.device != "auto" and self.device.type == "cuda" and not torch.cuda.is_available():
            raise DataError("--device cuda asked for, but torch sees no GPU; use --device cpu or auto")
        self.dist = Dist(self.device)
        if self.device.type == "cuda" and self.dist.world > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.master = self.dist.rank == 0
        self.out = Path(args.out or f"runs/{args.dataset}-{args.eps_text.replace('/', '_')}-{args.method}")
        self.ck_path = self.out / "last.pt"
        self.cfg, self.ck = resolve(args), None
        prepare_output(self.out, args, self.master)  # before the data and the model: nothing is lost to a typo
        if args.resume:
            self.ck = load_checkpoint(self.ck_path)
            self.cfg = check_resume(args, self.cfg, self.ck["config"], self.ck["epoch"])
        self.step = self.ck["step"] if self.ck else 0
        self.saved = {"step": self.step, "epoch": self.ck["epoch"] if self.ck else 0}  # what last.pt holds
        self.finished = self.ck is not None and self.ck["epoch"] >= total_epochs(self.cfg)

    def setup(self):
        """Data, model, optimiser and the step function (restored from the checkpoint when resuming)."""
        cfg, args, ck, device = self.cfg, self.args, self.ck, self.device
        torch.manual_seed(cfg["seed"])
        (self.x_train, self.y_train), (self.x_test, self.y_test), self.val = setup_data(cfg, args, device)
        cuda = device.type == "cuda"
        if args.cuda_graphs and not cuda and not GraphedStep.DRY_RUN:
            raise DataError("--cuda-graphs needs a GPU (--device cuda)")
        graphs = (cuda if args.cuda_graphs is None else args.cuda_graphs) and self.dist.world == 1 and not args.trace
        graphs = graphs and cfg["method"] != "pgd"  # PGD training has not been tried under graphs on a GPU
        self.model, self.opt, self.tg = prepare_training(cfg, device, self.dist, graphs)
        bs = cfg["batch_size"]
        if bs % self.dist.world:
            raise DataError(f"--batch-size {bs} must be divisible by the number of processes ({self.dist.world})")
        self.spe = max(1, len(self.y_train) // bs)  # steps per epoch (the last partial batch is dropped)
        self.total = total_epochs(cfg) * self.spe
        self.graphs, self.stage = graphs, 0
        # resumed in a latent stage: its optimiser and TwoGradient, those of the last step taken
        saved_stage = schedule(cfg, (self.step - 1) / self.spe)["stage"] if ck is not None and self.step else 0
        if saved_stage:
            self.enter_stage(saved_stage, build=False)
        if ck is not None:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            for g in self.opt.param_groups:
                g["lr"] = float(g["lr"])  # a run under CUDA graphs saves it as a tensor
            self.tg.load_state_dict(ck["two_gradient"])
            torch.set_rng_state(ck["rng"]["torch"])
            if cuda and ck["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
        self.best = ck.get("best_val", math.inf) if ck else math.inf
        self.history = list(ck.get("clean_err_history", [])) if ck else []  # train clean error per epoch
        self.classes = self.model[-1].out_features
        for name, labels in (("training", self.y_train), ("test", self.y_test)):
            if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < self.classes):
                raise DataError(f"the {name} labels must lie in [0, {self.classes}); the data files may be damaged")
        self.run_step, self.tally = build_step(self.model, self.opt, self.tg, cfg, device, self.dist, graphs, self.step)
        self.trace = open(args.trace, "a") if args.trace and self.master else None
        self.progress = Progress(cfg, self.spe, args.progress)
        self.perm_epoch = self.perm = None
        self.phases = {}

    def enter_stage(self, stage, build=True):
        """Latent stage `stage`: freeze the first `stage` affine layers (cumulatively), then a fresh Adam
        and a fresh TwoGradient over what still trains, and the step built anew for them."""
        for i in affine_layers(self.model)[:stage]:
            self.model[i].requires_grad_(False)
        self.opt = make_optimizer(self.model, self.cfg, self.device, self.graphs)
        self.tg = make_two_gradient(self.model, self.cfg, self.dist)
        if build:
            self.run_step, self.tally = build_step(self.model, self.opt, self.tg, self.cfg, self.device, self.dist,
                                                   self.graphs, self.step)
        self.stage = stage

    def batch(self):
        """The next training batch, on the device; one seeded shuffle per epoch, so a resumed run sees
        the same batches."""
        epoch, k = divmod(self.step, self.spe)
        if epoch != self.perm_epoch:
            g = torch.Generator().manual_seed(self.cfg["seed"] * 100003 + epoch)
            self.perm_epoch, self.perm = epoch, torch.randperm(len(self.y_train), generator=g).to(self.device)
        bs, dist = self.cfg["batch_size"], self.dist
        idx = self.perm[(k * bs):(k + 1) * bs][dist.rank::dist.world]
        x, y = self.x_train[idx].float() / 255, self.y_train[idx]
        # a config without "crop" gets the paper presets' augmentation (CIFAR: 4-pixel zero padding)
        crop = self.cfg.get("crop", [4, "constant"] if self.cfg["dataset"] == "cifar" else None)
        if crop:
            x = augment(x, *crop)
        if self.cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def checkpoint(self, epoch, path=None):
        """Save everything needed to resume exactly, atomically: a failed write keeps the old file."""
        path = path or self.ck_path
        if self.master:
            save_atomic({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                         "two_gradient": self.tg.state_dict(), "epoch": epoch, "step": self.step, "config": self.cfg,
                         "best_val": self.best, "clean_err_history": self.history,
                         "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device)
                                 if self.device.type == "cuda" else None}}, path)
        if path == self.ck_path:
            self.saved.update(step=self.step, epoch=epoch)

    def log(self, rec):
        try:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(strict_json(rec) + "\n")
        except OSError as err:
            raise DataError(f"could not append to {self.out / 'log.jsonl'} ({err.strerror or err}); {self.ck_path} "
                            f"still holds epoch {self.saved['epoch']}: fix the folder, then --resume")


def epoch_record(r, s, done):
    """The epoch's figures (summed on the device, read once here) and, when due, the test figures."""
    bad = int(r.tally.first_bad)  # the host waits for the GPU here, once per epoch
    if bad >= 0:  # before anything is saved: last.pt keeps the end of the last good epoch
        raise DataError(f"non-finite loss at epoch {bad // r.spe + 1}, step {bad}; stopping. The last good "
                        f"checkpoint, {r.ck_path}, is intact: lower --lr and --resume, or look at the data")
    means = r.tally.means()
    m = dict(zip(FIGURES, (v / r.dist.world for v in r.dist.sum([means[key] for key in FIGURES]))))
    epoch = r.step // r.spe if done else r.step / r.spe
    rec = {"epoch": epoch, "step": r.step, "phase": s["phase"], "eps_adv": s["eps_adv"], "eps_ver": s["eps_ver"],
           "beta": s["beta"], "c_t": s["c_t"], "kappa": s["kappa"], "lr": s["lr"], "k_adv": m["k_adv"],
           "k_ver": m["k_ver"], "conflict": m["conflict"], "loss_adv": m["loss_adv"], "loss_ver": m["loss_ver"],
           "clean_err": m["clean_wrong"], "adv_err": m["adv_wrong"], "ver_err": m["ver_wrong"],
           "seconds": time.time() - r.t0, "phases": list(r.phases)}
    if r.cfg.get("reg"):  # the warm-up regularisers' values (unweighted), while they are on
        rec.update(reg=s["reg"], reg_tight=m["reg_tight"], reg_relu=m["reg_relu"])
    if done and r.master and (epoch % r.args.eval_every == 0 or r.step == r.total):
        r.model.eval()
        with certmin.ieee(r.device.type):
            rec["test_clean_err"], rec["test_ibp_verified_err"] = evaluate(r.model, r.x_test, r.y_test, r.cfg["eps"])
            if r.val is not None:
                rec["val_clean_err"], rec["val_ibp_verified_err"] = evaluate(r.model, *r.val, r.cfg["eps"])
        r.model.train()
    return rec


def report(r, rec, reason):
    """The epoch's table row, its test line, and its line in log.jsonl."""
    if not r.master:
        return
    print(row(rec), flush=True)
    if "test_clean_err" in rec:
        line = (f"  test: clean error {rec['test_clean_err']:.4f}, IBP-verified error "
                f"{rec['test_ibp_verified_err']:.4f} at eps {r.cfg['eps']:.4f}")
        if "val_clean_err" in rec:
            line += f"; validation: clean {rec['val_clean_err']:.4f}, IBP-verified {rec['val_ibp_verified_err']:.4f}"
        print(line, flush=True)
    r.log({**rec, "collapse": reason, "config": r.cfg})


def collapsed(r, rec, reason, phase):
    """The collapse guard: True to stop (last.pt keeps the epoch before; the collapsed weights go aside)."""
    ep = rec["epoch"]
    if r.args.allow_collapse:
        if r.master:
            print(f"warning: training collapsed in epoch {ep}: {reason}; training on (--allow-collapse)",
                  file=sys.stderr, flush=True)
        return False
    r.checkpoint(ep, r.out / "collapsed.pt")
    if r.master:
        print(f"error: training collapsed in epoch {ep} ({phase}): {reason}; verified loss {rec['loss_ver']:.3f} "
              f"(ln {r.classes} = {math.log(r.classes):.3f} is the constant classifier's). Stopping: {r.ck_path} "
              f"still holds step {r.saved['step']} (epoch {r.saved['epoch']}), the last good one, and "
              f"{r.out / 'collapsed.pt'} the collapsed weights. What to change: a longer schedule (--epochs; the "
              f"preset's is 250 on MNIST, results/README.md 'The collapse'), or --allow-collapse to train on regardless.",
              file=sys.stderr, flush=True)
    return True


def end_of_epoch(r, s):
    """Figures, evaluation, log, collapse guard and saves at the end of an epoch (or of an interrupted
    one). Returns an exit status to stop with, or None to go on."""
    done = r.step % r.spe == 0 or r.step == r.total
    rec = epoch_record(r, s, done)
    ep = rec["epoch"]
    reason = collapse_reason(rec["clean_err"], r.history, r.classes) if done else None
    report(r, rec, reason)
    if reason and collapsed(r, rec, reason, s["phase"]):
        return 3
    if done:
        r.history.append(rec["clean_err"])
    if rec.get("val_ibp_verified_err", math.inf) < r.best:
        r.best = rec["val_ibp_verified_err"]
        r.checkpoint(ep, r.out / "best.pt")
    stopping = r.args.stop_after and done and ep >= r.args.stop_after
    if not done or ep % r.args.save_every == 0 or r.step == r.total or stopping or r.stop["now"]:  # Ctrl-C saves
        r.checkpoint(ep if done else r.step // r.spe)
    r.phases, r.t0 = {}, time.time()
    r.progress.reset()
    return 0 if stopping else None


def start(args):
    """The Run, set up and announced; None when it is a finished run resumed."""
    r = Run(args)
    if r.finished:
        if r.master:
            print(f"{r.ck_path} is a finished run (epoch {r.saved['epoch']} of {total_epochs(r.cfg)}): nothing to train. "
                  f"Certify it with: python verify.py {r.out}", flush=True)
        return None
    if args.resume and r.master:
        print(f"resuming {r.ck_path} at epoch {r.saved['epoch']} (step {r.step})", flush=True)
    r.setup()
    cfg, world = r.cfg, r.dist.world
    if r.master:
        print(f"{cfg['method']} on {cfg['dataset']} eps {cfg['eps']:.4f} (train {cfg['eps_train']:.4f}), "
              f"{cfg['model']}, {cfg['epochs']} epochs x {r.spe} steps, batch {cfg['batch_size']}, {r.device}"
              f"{f' x {world} processes' if world > 1 else ''}; writing {r.out}", flush=True)
        print(header(), flush=True)
    r.stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: r.stop.update(now=True))  # finish the step, save, exit
    r.t0 = time.time()
    return r


def train(args):
    r = start(args)
    if r is None:
        return 0
    status = None
    while r.step < r.total and not r.stop["now"] and status is None:
        x, y = r.batch()
        s = schedule(r.cfg, r.step / r.spe)
        if s["stage"] != r.stage:
            r.enter_stage(s["stage"])
        rec = r.run_step(x, y, s)
        if r.trace:  # one line per step: a sync per step, for post-mortems only
            r.trace.write(strict_json({"step": r.step, "epoch": r.step / r.spe, "phase": s["phase"], "lr": s["lr"],
                                       "eps_ver": s["eps_ver"], **{k: float(v) for k, v in rec.items()}}) + "\n")
        r.phases.setdefault(s["phase"], None)
        r.step += 1
        if r.master and args.progress:
            r.progress.tick(r.step, s["phase"])
        if r.step % r.spe == 0 or r.step == r.total or r.stop["now"]:
            status = end_of_epoch(r, s)
    return finish(r, status)


def finish(r, status):
    """Close the trace, say how to resume an interrupted run, check that all ranks agree; the exit status."""
    if r.trace:
        r.trace.close()
    if r.stop["now"] and r.master:
        print(f"interrupted: saved {r.ck_path} at step {r.step}; continue with --resume", flush=True)
    if r.dist.world > 1:  # every rank must hold the same weights; say so loudly if not
        flat = torch.cat([p.detach().reshape(-1).double() for p in r.model.parameters()])
        check = flat.clone()
        r.dist.mean_([check])  # the float64 mean of identical float32 values is exact
        if not torch.equal(check, flat):
            raise DataError(f"rank {r.dist.rank} holds different parameters from the mean of all ranks")
        if r.master:
            print(f"all {r.dist.world} ranks hold identical parameters", flush=True)
        import torch.distributed as tdist
        tdist.destroy_process_group()
    return status or (130 if r.stop["now"] else 0)


def make_parser():
    """The command line's options, with their help."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # whole option names only: --resume checks which were given
    ap.add_argument("--dataset", required=True, choices=sorted(PRESETS), help="picks the preset with --eps and --recipe")
    ap.add_argument("--eps", required=True, type=str, help="test epsilon in pixel space, e.g. 0.3 or 8/255")
    ap.add_argument("--method", default="advibp", choices=METHODS,
                    help="advibp (the paper), advcrown-ibp (verified term beta 1->0 over the ramp), ibp (Gowal et al. "
                         "2018), crown-ibp (Zhang et al. 2020), pgd (Madry et al.), natural")
    ap.add_argument("--weights", default="advibp", choices=certmin.MODES,
                    help="the two-gradient rule, for ablations: advibp (bias-corrected), advibp-biased (current "
                         "batch), mgda (min-norm), sum (1, 1)")
    ap.add_argument("--pipeline", default="paper", choices=("paper", "released"),
                    help="for advibp / advcrown-ibp: paper (the paper's algorithm: FGSM-RS warm-up, then the weighted "
                         "joint loss through the verified-eps ramp) or released (the authors' released code: natural "
                         "training through the warm-up, the verified loss alone through the ramp, then the same joint "
                         "rule at full eps)")
    ap.add_argument("--weight-scope", default="full", choices=certmin.SCOPES,
                    help="the gradient the two-gradient weights are computed from: full (every parameter) or first "
                         "(the first trainable tensor only, as the authors' code does); the update uses all of it")
    ap.add_argument("--latent-stages", type=int, default=0,
                    help="for advibp / advcrown-ibp: after the schedule, this many layer-wise latent stages as in the "
                         "authors' code (stage k freezes the first k Linear/Conv layers and attacks inside the IBP box "
                         "of layer k's input; both eps full, c_t 0, a fresh Adam at lr/4)")
    ap.add_argument("--latent-epochs", type=int, default=None, help="epochs per latent stage (default: --epochs, "
                    "or the preset's: 250 on MNIST as in the authors' code)")
    ap.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                    help="paper: the paper's presets (DM-large; 250 MNIST / 3200 CIFAR epochs). fast: Shi et al.'s "
                         "(2021) short recipe: CNN-7 with BatchNorm, IBP initialisation, warm-up regularisers, gradient "
                         "clipping, 70 MNIST / 160 CIFAR epochs; for --method ibp and advibp (README, 'Training')")
    ap.add_argument("--model", default=None, choices=sorted(MODELS),
                    help="default: the recipe's (dm-large for paper, cnn7 for fast); dm-small-bn and cnn7 have BatchNorm")
    ap.add_argument("--epochs", type=int, default=None, help="default: the preset's; scales every epoch number")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="global batch size (split across processes); default: the preset's (256)")
    ap.add_argument("--lr", type=float, default=None, help="Adam's learning rate; default: the preset's (5e-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--data", default="data", help="folder with the datasets (downloaded there if missing)")
    ap.add_argument("--no-download", action="store_true", help="never try to download a missing dataset")
    ap.add_argument("--out", default=None, help="output folder (default runs/DATASET-EPS-METHOD)")
    ap.add_argument("--resume", action="store_true",
                    help="continue exactly where --out/last.pt stopped, with the checkpoint's config (an option that "
                         "contradicts it is refused)")
    ap.add_argument("--overwrite", action="store_true",
                    help="start afresh in an --out that holds a run: deletes its last.pt, best.pt, collapsed.pt and "
                         "log.jsonl first (without it such a folder is refused)")
    ap.add_argument("--val-split", type=int, default=0,
                    help="hold out N training images; best.pt is the checkpoint with the lowest validation "
                         "IBP-verified error (never selected on the test set). 0: keep only last.pt")
    ap.add_argument("--train-n", type=int, default=0, help="use only the first N training images (smoke runs)")
    ap.add_argument("--test-n", type=int, default=0, help="evaluate on the first N test images only")
    ap.add_argument("--eval-every", type=int, default=5, help="epochs between test evaluations (and at the end)")
    ap.add_argument("--stop-after", type=int, default=0, help="stop after this many epochs (resume later)")
    ap.add_argument("--pgd-steps", type=int, default=10, help="PGD steps per batch for --method pgd")
    add_speed_and_logging_options(ap)
    return ap


def add_speed_and_logging_options(ap):
    """The options that change how fast a run goes and what it prints and keeps, not what it trains."""
    ap.add_argument("--precision", default="tf32", choices=PRECISIONS,
                    help="arithmetic of the training losses: fp32 (exact float32), tf32 (on CUDA TF32 matmuls and "
                         "convolutions; the default; float32 on the CPU), bf16 (TF32 plus bf16 autocast, on the CPU "
                         "too). Certificates (verify.py, the test figures) are always full float32")
    ap.add_argument("--amp", dest="precision", action="store_const", const="bf16", help="the same as --precision bf16")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="replay each phase's step as one CUDA graph (default: on with one GPU; off with several "
                         "processes or --trace)")
    ap.add_argument("--channels-last", action="store_true",
                    help="keep the model and batches in channels_last (NHWC) memory format: on the H100 it saved the "
                         "layout transposes of cuDNN's tensor-core kernels (results/README.md, 'CUDA')")
    ap.add_argument("--clean-n", type=int, default=0,
                    help="the train clean error (log, collapse guard) from the first N examples of each batch, one "
                         "no-grad forward after the step; 0: the whole batch. Does not change the training")
    ap.add_argument("--save-every", type=int, default=1,
                    help="epochs between checkpoints (last.pt; also at the end, at --stop-after and on Ctrl-C)")
    ap.add_argument("--allow-collapse", action="store_true",
                    help="train on when an epoch collapses to the constant classifier (by default the run stops "
                         "with exit status 3, keeps last.pt at the last good epoch and saves collapsed.pt)")
    ap.add_argument("--trace", default=None, help="append one JSON line per training step to this file "
                    "(losses, weights k_adv/k_ver/k_reg, gradient norms, errors); slower")
    ap.add_argument("--progress", type=float, default=30, help="seconds between progress lines within an epoch")


def parse_args(argv=None):
    """train.py's command line as a Namespace (argparse errors exit with status 2), as main() takes it."""
    ap = make_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    args.given = {a.dest for a in ap._actions if any(o in argv or any(v.startswith(o + "=") for v in argv)
                                                     for o in a.option_strings)}
    if args.resume and args.overwrite:
        ap.error("--resume and --overwrite contradict each other: continue the run, or delete it and start again")
    try:
        args.eps_text, args.eps = args.eps, parse_eps(args.eps)
    except argparse.ArgumentTypeError as err:
        ap.error(f"argument --eps: {err}")
    for name in ("epochs", "batch_size", "save_every"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.clean_n < 0:
        ap.error("--clean-n must be >= 0 (0: the whole batch)")
    if args.latent_stages:
        model = args.model or RECIPES[args.recipe][args.dataset]["model"]
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in MODELS[model]()):
            ap.error(f"--latent-stages: {model} has BatchNorm, which latent stages do not support; use a dm-* model")
        most = len(affine_layers(MODELS[model]())) - 1
        if args.method not in ("advibp", "advcrown-ibp") or not 0 < args.latent_stages <= most:
            ap.error(f"--latent-stages: 1 to {most} for {model}, with --method advibp or advcrown-ibp")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, Refused) else 1


if __name__ == "__main__":
    status = main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # Under torchrun, a CPU (gloo) rank can abort in C++ teardown at interpreter exit ("terminate called
        # without an active exception") after its work is done and saved: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
