"""The scripts' tests: train.py, verify.py and bench.py, end to end (the library's are in test_certmin.py)."""
import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bench
import certmin
import train
import verify
from test_certmin import (SHARED, autocast_on, crown_keeps_textbook_certificates, exact_ibp, mnist_test,
                          need_shared)

# ----------------------------------------------------------------------------------------------
# train.py: data, schedule, end-to-end runs, resume, bad input, several processes
# ----------------------------------------------------------------------------------------------

DATA = SHARED / "data"
SMALL = ["--dataset", "mnist", "--eps", "0.3", "--model", "dm-small", "--epochs", "2", "--train-n", "384",
         "--test-n", "200", "--batch-size", "64", "--data", str(DATA), "--eval-every", "1", "--no-download"]


def run_script(args, **kw):
    if any(str(DATA) in a for a in args):
        need_shared()
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent, **kw)


def in_process(argv):
    """train.main in this process, restoring the SIGINT handler it installs."""
    if any(str(DATA) in a for a in argv):
        need_shared()
    handler = signal.getsignal(signal.SIGINT)
    try:
        return train.main(argv)
    finally:
        signal.signal(signal.SIGINT, handler)


def test_mnist_loader_reads_the_real_files():
    need_shared()
    x, y, xt, yt = train.load_data("mnist", DATA, download=False)
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert x.max() == 255 and x.min() == 0
    assert torch.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(yt).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_cifar_loader_reads_the_real_files():
    need_shared()
    x, y, xt, yt = train.load_data("cifar", DATA, download=False)
    assert x.shape == (50000, 3, 32, 32) and xt.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [5000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    assert y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3] and yt[:4].tolist() == [3, 8, 8, 0]
    assert 0.4 < x.float().mean().item() / 255 < 0.5 and x.max() == 255


def test_mnist_download_checks_the_checksum(tmp_path, monkeypatch):
    need_shared()
    monkeypatch.setattr(train, "MNIST_URL", (DATA / "mnist").as_uri() + "/")  # a local "server"
    x, y, xt, yt = train.load_data("mnist", tmp_path, download=True)
    assert len(y) == 60000 and (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    monkeypatch.setitem(train.MNIST_FILES, "t10k-labels-idx1-ubyte.gz", "0" * 32)
    with pytest.raises(train.DataError, match="wrong checksum"):
        train.load_data("mnist", tmp_path / "other", download=True)
    with pytest.raises(train.DataError, match="MNIST not found.*t10k-images-idx3-ubyte.gz.*--data"):
        train.load_data("mnist", tmp_path / "none", download=False)


def test_augment_crops_and_flips_on_the_batch():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = train.augment(x)
    assert out.shape == x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(2):  # each output is some 32x32 window of the padded image, maybe mirrored
        windows = [padded[i, :, a:a + 32, b:b + 32] for a in range(9) for b in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def config(*options):
    """train.py's resolved config for a command line (no run)."""
    return train.resolve(train.parse_args(list(options)))


def test_schedule_follows_the_scaled_preset():
    cfg = config("--dataset", "cifar", "--eps", "8/255", "--epochs", "320")
    assert cfg["adv_ramp"] == [40, 80] and cfg["ver_ramp"] == [81, 181] and cfg["lr_decay"] == [220, 270]
    assert math.isclose(cfg["eps_train"], 8.8 / 255) and cfg["c_max"] == 0.0256
    phases = [train.schedule(cfg, e)["phase"] for e in (0, 50, 100, 200)]
    assert phases == ["natural", "adv-warmup", "joint", "joint-final"]
    s = train.schedule(cfg, 250)
    assert s["final"] and s["eps_ver"] == cfg["eps_train"] and math.isclose(s["lr"], 5e-5) and s["c_t"] == 0
    assert train.schedule(cfg, 100)["c_t"] == 0.0256
    for e in [0, 45, 60, 79.9]:  # the adversarial ramp is smooth and below eps_train
        assert 0 <= train.schedule(cfg, e)["eps_adv"] < cfg["eps_train"]


def test_released_pipeline_trains_naturally_then_on_the_verified_loss_alone():
    mnist = ("--dataset", "mnist", "--eps", "0.3")
    cfg = config(*mnist, "--pipeline", "released")
    s = {e: train.schedule(cfg, e) for e in (5, 30, 75, 99.9, 100, 200)}
    assert [s[e]["phase"] for e in s] == ["natural", "natural", "ver-ramp", "ver-ramp", "joint-final", "joint-final"]
    assert all(s[e]["eps_adv"] == 0 for e in (5, 30, 75, 99.9)) and s[100]["eps_adv"] == cfg["eps_train"]
    assert 0 < s[75]["eps_ver"] < cfg["eps_train"] and s[75]["kappa"] == 0 and s[100]["final"]
    assert train.step_function("advibp", "ver-ramp") is train.bound_step
    paper = config(*mnist)
    assert [train.schedule(paper, e)["phase"] for e in (5, 30, 75, 100)] == ["natural", "adv-warmup", "joint", "joint-final"]
    ibp = config(*mnist, "--pipeline", "released", "--method", "ibp")  # the option leaves the baselines alone
    assert [train.schedule(ibp, e)["phase"] for e in (5, 75, 100)] == ["natural", "ibp", "ibp-final"]
    crown = config(*mnist, "--pipeline", "released", "--method", "advcrown-ibp")
    assert train.schedule(crown, 75)["phase"] == "ver-ramp" and 0 < train.schedule(crown, 75)["beta"] < 1


def test_fast_recipe_schedule_is_shi_et_als_with_advibps_phases_inside_it():
    cifar = ("--dataset", "cifar", "--eps", "8/255", "--recipe", "fast")
    cfg = config(*cifar, "--method", "ibp")
    assert (cfg["epochs"], cfg["batch_size"], cfg["model"], cfg["init"], cfg["grad_clip"]) == (160, 128, "cnn7", "ibp", 10.0)
    assert cfg["eps_train"] == cfg["eps"] == 8 / 255 and cfg["crop"] == [2, "replicate"] and cfg["ibp_ramp"] == [1, 81]
    s = {e: train.schedule(cfg, e) for e in (0.5, 1, 41, 80.99, 81, 119.9, 120, 140)}
    assert [s[e]["phase"] for e in s] == ["ibp"] * 4 + ["ibp-final"] * 4
    assert s[0.5]["eps_ver"] == s[1]["eps_ver"] == 1e-6 and s[0.5]["reg"] == pytest.approx(0.5 * (1 - 1e-6 / cfg["eps_train"]))  # the floor
    assert 1e-6 < s[41]["eps_ver"] < cfg["eps_train"] and 0 < s[41]["reg"] < 0.5 and s[41]["kappa"] == 0
    assert s[81]["eps_ver"] == cfg["eps_train"] and s[81]["reg"] == 0 and s[81]["final"]
    assert [s[e]["lr"] for e in (119.9, 120, 140)] == pytest.approx([5e-4, 1e-4, 2e-5])
    adv = config(*cifar)
    phases = [train.schedule(adv, e)["phase"] for e in (0, 9.9, 10, 80.9, 81, 159)]
    assert phases == ["adv-warmup", "adv-warmup", "joint", "joint", "joint-final", "joint-final"]
    assert train.schedule(adv, 81.5)["c_t"] == adv["c_max"] and train.schedule(adv, 98)["c_t"] == 0
    assert 0 < train.schedule(adv, 50)["reg"] < 0.5 and train.schedule(adv, 100)["reg"] == 0
    mnist = config("--dataset", "mnist", "--eps", "0.3", "--recipe", "fast", "--method", "ibp", "--epochs", "35")
    assert mnist["epochs"] == 35 and mnist["ibp_ramp"] == [0.5, 10.5] and mnist["lr_decay"] == [25, 30]
    assert mnist["eps_train"] == 0.4 and mnist["crop"] is None and mnist["batch_size"] == 256
    paper = config("--dataset", "mnist", "--eps", "0.3", "--method", "ibp")  # the paper's preset is unchanged
    assert paper["model"] == "dm-large" and paper["reg"] == 0 and paper["ibp_ramp"] == [10, 100]
    assert train.schedule(paper, 50)["kappa"] == pytest.approx(1 - 0.5 * 40 / 90)


def test_augment_with_edge_padding_crops_from_the_replicated_border():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = train.augment(x, 2, "replicate")
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(2):
        windows = [padded[i, :, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


FAST = SMALL + ["--recipe", "fast", "--model", "dm-small-bn", "--epochs", "3"]


@pytest.mark.parametrize("method", ["ibp", "advibp"])
def test_fast_recipe_trains_with_batchnorm_resumes_exactly_and_verifies(method, tmp_path, capsys):
    """A BatchNorm network through every phase of the fast recipe: the regularisers logged while eps ramps,
    the running statistics updated, a resumed run equal to the uninterrupted one (weights and BatchNorm
    buffers), and verify.py certifying the checkpoint in exact arithmetic (eval mode, running statistics)."""
    opts = FAST + ["--method", method, "--allow-collapse"]
    assert in_process(opts + ["--out", str(tmp_path / "a")]) == 0
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    ramp = [r for r in log if not r["phases"][-1].endswith("final")]
    assert ramp and all(r["reg"] > 0 and math.isfinite(r["reg_tight"]) and math.isfinite(r["reg_relu"]) for r in ramp)
    ck = train.load_checkpoint(tmp_path / "a" / "last.pt")
    assert ck["model"]["1.num_batches_tracked"] == ck["step"]  # one clean pass per step updates them
    assert in_process(opts + ["--out", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    assert in_process(opts + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    resumed = train.load_checkpoint(tmp_path / "b" / "last.pt")
    for k, v in ck["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    capsys.readouterr()
    assert verify.main(verify_args(tmp_path / "a" / "last.pt", "--eps", "0.01", "--methods", "ibp,crown-ibp")) == 0
    assert "every certificate holds in exact arithmetic" in capsys.readouterr().out


def test_fast_recipe_step_never_waits_for_the_device_and_graphs_match(monkeypatch):
    """The fast recipe's steps (BatchNorm statistics, regularisers, gradient clipping) read nothing back to
    the host, eager or on the graphs' path."""
    import argparse
    for method, phases in (("ibp", bench.IBP_PHASES), ("advibp", bench.PHASES)):
        setup = argparse.Namespace(dataset="mnist", eps="0.3", model="dm-small-bn", batch=16, device="cpu", clean_n=8,
                                   recipe="fast", method=method)
        train_, cfg, model, run_step, tally, x, y = bench._step_setup(setup, "fp32+graphs", capture=False)
        reads = host_reads(monkeypatch)
        for phase in phases:
            if phase == "natural":
                continue  # the fast recipe has none
            s = train_.schedule(cfg, bench.phase_epoch(cfg, phase))
            assert s["phase"] == phase
            for _ in range(train_.GraphedStep.WARMUP + 2):
                with reads:
                    run_step(x, y, s)
                assert not reads.found, f"{method} {phase}: the step reads {dict(reads.found)} back to the host"
        assert math.isfinite(tally.means()["loss_ver"])


def test_latent_stages_refuse_a_batchnorm_model(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "mnist", "--eps", "0.3", "--recipe", "fast", "--latent-stages", "1"])
    assert "cnn7 has BatchNorm" in capsys.readouterr().err


def test_released_pipeline_with_first_tensor_weights_trains_and_resumes_exactly(tmp_path):
    opts = SMALL + ["--pipeline", "released", "--weight-scope", "first", "--allow-collapse"]
    assert in_process(opts + ["--out", str(tmp_path / "a")]) == 0
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert {p for r in log for p in r["phases"]} == {"natural", "ver-ramp", "joint-final"}
    ck = train.load_checkpoint(tmp_path / "a" / "last.pt")
    assert ck["config"]["pipeline"] == "released" and ck["two_gradient"]["scope"] == "first"
    assert in_process(opts + ["--out", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    assert in_process(opts + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    resumed = train.load_checkpoint(tmp_path / "b" / "last.pt")
    for k, v in ck["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


def test_training_passes_every_phase_and_resumes_exactly(tmp_path):
    assert in_process(SMALL + ["--out", str(tmp_path / "a")]) == 0
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2]
    assert {p for r in log for p in r["phases"]} == {"natural", "adv-warmup", "joint", "joint-final"}
    assert log[-1]["config"]["eps_train"] == 0.4 and 0 <= log[-1]["test_ibp_verified_err"] <= 1
    ck = train.load_checkpoint(tmp_path / "a" / "last.pt")
    assert ck["epoch"] == 2 and ck["config"]["model"] == "dm-small" and ck["two_gradient"]["count"] > 0
    # stop after one epoch, then resume: the same weights as the uninterrupted run
    assert in_process(SMALL + ["--out", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    assert train.load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    assert in_process(SMALL + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    resumed = train.load_checkpoint(tmp_path / "b" / "last.pt")
    assert resumed["step"] == ck["step"]
    for k, v in ck["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert not list(tmp_path.glob("*/*.tmp"))


def test_the_cuda_graph_path_gives_the_same_weights_on_the_cpu(tmp_path, monkeypatch):
    """--cuda-graphs takes the schedule's changing values as device tensors and updates every state in
    place. On the CPU (every step eager, DRY_RUN) that path must give exactly the plain path's weights,
    and it must pick the phases to capture: one graph per phase, the eps_adv ramp's too."""
    args = SMALL + ["--epochs", "8", "--save-every", "4"]
    assert in_process(args + ["--out", str(tmp_path / "plain")]) == 0
    made, real = [], train.GraphedStep
    monkeypatch.setattr(real, "DRY_RUN", True)
    monkeypatch.setattr(train, "GraphedStep", type("Spy", (real,), {
        "__init__": lambda self, *a, **k: (made.append(self), real.__init__(self, *a, **k))[1]}))
    assert in_process(args + ["--out", str(tmp_path / "graphs"), "--cuda-graphs"]) == 0
    plain, graphs = (train.load_checkpoint(tmp_path / d / "last.pt") for d in ("plain", "graphs"))
    assert plain["step"] == graphs["step"] == 8 * 6
    for k, v in plain["model"].items():
        assert torch.equal(v, graphs["model"][k]), k
    assert plain["two_gradient"]["count"] == graphs["two_gradient"]["count"] > 0
    assert torch.equal(plain["two_gradient"]["m_a"], graphs["two_gradient"]["m_a"])
    # natural lasts 2 steps here, fewer than WARMUP
    assert made[0].captured == ["adv-warmup", "joint", "joint-final"]
    log = [json.loads(line) for line in open(tmp_path / "graphs" / "log.jsonl")]
    assert [json.loads(line)["loss_ver"] for line in open(tmp_path / "plain" / "log.jsonl")] == [r["loss_ver"] for r in log]


HOST_READS = {"_local_scalar_dense", "is_nonzero", "item", "equal", "nonzero", "masked_select", "unique",
              "_unique", "_unique2", "unique_consecutive", "allclose"}  # ops whose result the host must wait for


def host_reads(monkeypatch):
    """A dispatch mode that counts, by name, the ATen operators whose result the host must wait for:
    .item(), bool() and float() of a tensor (_local_scalar_dense), data-dependent shapes (nonzero, a
    boolean mask's indexing). Adam is torch's and is left out: on CUDA train.py makes it fused or
    capturable (its step count on the device); on the CPU its step count is a host tensor, read as such."""
    from torch.utils._python_dispatch import TorchDispatchMode
    import collections
    inside, adam_step = [0], torch.optim.Adam.step

    def step(self, *a, **k):
        inside[0] += 1
        try:
            return adam_step(self, *a, **k)
        finally:
            inside[0] -= 1
    monkeypatch.setattr(torch.optim.Adam, "step", step)

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            boolean_index = name.startswith("index") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for a in args[1:2] if isinstance(a, (list, tuple))
                for t in a)
            if not inside[0] and (name in HOST_READS or boolean_index):
                self.found[name] += 1
            return func(*args, **(kwargs or {}))
    return Reads()


@pytest.mark.parametrize("variant", ["fp32", "fp32+graphs", "bf16+graphs+cl"])
def test_the_training_step_never_waits_for_the_device(variant, monkeypatch):
    """train.py's step (AdvIBP, every phase, eager and the CUDA-graph path) reads nothing back
    to the host, so on a GPU the host never waits. Every ATen operator the step calls is seen here
    (small tensors: nothing runs compiled). Fails on a .item(), a bool() of a tensor or a boolean
    mask's indexing put into the step (checked by hand)."""
    import argparse
    setup = argparse.Namespace(dataset="mnist", eps="0.3", model="dm-small", batch=16, device="cpu", clean_n=8)
    train_, cfg, model, run_step, tally, x, y = bench._step_setup(setup, variant, capture=False)
    reads = host_reads(monkeypatch)
    for phase in bench.PHASES:
        s = train_.schedule(cfg, bench.phase_epoch(cfg, phase))
        assert s["phase"] == phase
        for _ in range(train_.GraphedStep.WARMUP + 2):  # the eager steps, then the would-be captured path
            with reads:
                run_step(x, y, s)
            assert not reads.found, f"{phase}: the step reads {dict(reads.found)} back to the host"
    figures = tally.means()
    assert math.isfinite(figures["loss_ver"]) and 0 <= figures["clean_wrong"] <= 1


@pytest.mark.parametrize("graphs", [False, True])
def test_train_py_reads_back_per_epoch_not_per_step(tmp_path, monkeypatch, graphs):
    """The whole training loop (data, schedule, steps, logging, evaluation, checkpoints) reads the
    device the same number of times whether an epoch has 6 steps or 12: the figures are read once
    per epoch."""
    monkeypatch.setattr(train.GraphedStep, "DRY_RUN", True)
    counts, reads = [], host_reads(monkeypatch)
    for n in (384, 768):
        reads.found.clear()
        with reads:
            args = SMALL + ["--train-n", str(n), "--epochs", "3", "--out", str(tmp_path / str(n))]
            assert in_process(args + (["--cuda-graphs"] if graphs else [])) == 0
        counts.append(dict(reads.found))
    assert counts[0] == counts[1], counts


def test_channels_last_and_clean_n_train_and_resume(tmp_path):
    """--channels-last trains every phase and resumes exactly. --clean-n changes the logged clean error
    only. (Twelve Adam steps amplify rounding differences: the layouts are compared step by step below.)"""
    assert in_process(SMALL + ["--out", str(tmp_path / "nchw")]) == 0
    assert in_process(SMALL + ["--out", str(tmp_path / "cl"), "--channels-last"]) == 0
    assert in_process(SMALL + ["--out", str(tmp_path / "cl2"), "--channels-last", "--stop-after", "1"]) == 0
    assert in_process(SMALL + ["--out", str(tmp_path / "cl2"), "--resume"]) == 0
    assert in_process(SMALL + ["--out", str(tmp_path / "c16"), "--clean-n", "16"]) == 0
    nchw, cl, cl2, c16 = (train.load_checkpoint(tmp_path / d / "last.pt") for d in ("nchw", "cl", "cl2", "c16"))
    assert cl["config"]["channels_last"] and cl["model"]["0.weight"].is_contiguous(memory_format=torch.channels_last)
    for k, v in nchw["model"].items():
        assert torch.equal(cl["model"][k], cl2["model"][k]), k
        assert torch.equal(v, c16["model"][k]), k
    logs = [[json.loads(line)["clean_err"] for line in open(tmp_path / d / "log.jsonl")] for d in ("nchw", "c16")]
    assert logs[0] != logs[1]


@pytest.mark.parametrize("phase", ["adv-warmup", "joint", "joint-final"])
def test_channels_last_changes_only_the_memory_layout_of_a_step(phase):
    """One training step in NCHW and in channels_last from the same weights and batch: the same gradients
    within float32 rounding (summation order), each in its parameter's layout."""
    import argparse
    setup = argparse.Namespace(dataset="mnist", eps="0.3", model="dm-small", batch=16, device="cpu", clean_n=0)
    grads = []
    for variant in ("fp32", "fp32+cl"):
        train_, cfg, model, run_step, tally, x, y = bench._step_setup(setup, variant)
        torch.manual_seed(1)  # the same FGSM-RS start
        run_step(x, y, train_.schedule(cfg, bench.phase_epoch(cfg, phase)))
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max().item()), (a - b).abs().max()


def test_bf16_autocast_trains_on_the_cpu_and_certifies_in_float32(tmp_path):
    """--precision bf16 runs the training losses in bf16 autocast (on the CPU too), so the weights
    differ from float32's; the parameters, the checkpoint and the test figures stay float32."""
    assert in_process(SMALL + ["--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    assert in_process(SMALL + ["--out", str(tmp_path / "fp32"), "--precision", "fp32"]) == 0
    bf16, fp32 = (train.load_checkpoint(tmp_path / d / "last.pt") for d in ("bf16", "fp32"))
    assert bf16["config"]["precision"] == "bf16" and all(v.dtype == torch.float32 for v in bf16["model"].values())
    assert not all(torch.equal(v, bf16["model"][k]) for k, v in fp32["model"].items())
    log = json.loads(open(tmp_path / "bf16" / "log.jsonl").readlines()[-1])
    assert 0 <= log["test_ibp_verified_err"] <= 1 and math.isfinite(log["loss_ver"])


def test_two_gradient_keeps_each_gradient_in_its_parameters_layout():
    conv = nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    x = torch.rand(4, 2, 5, 5)
    tg = certmin.TwoGradient(conv.parameters())
    tg.step(conv(x).pow(2).mean(), conv(x).abs().mean())
    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
    expected = torch.autograd.grad(conv(x).pow(2).mean() + conv(x).abs().mean(), conv.weight)[0]
    assert conv.weight.grad.shape == expected.shape and conv.weight.grad.stride() == conv.weight.stride()


def test_bench_train_step_times_variants_and_checks_graphs(tmp_path):
    """bench.py train-step on the CPU (the graphs path without capturing): a row per variant, and the
    graphs-vs-eager check, which on the CPU must agree exactly."""
    out = tmp_path / "step.json"
    done = run_script(["bench.py", "train-step", "--device", "cpu", "--model", "dm-small", "--batch", "16", "--steps", "2",
                       "--windows", "1", "--warmup", "4", "--variants", "fp32,fp32+graphs+cl", "--check",
                       "--json", str(out), "--profile", str(tmp_path / "prof")])
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["rows"]] == ["fp32", "fp32+graphs+cl"]
    assert all(r["ms"] > 0 for r in report["rows"]) and report["rows"][1]["captured"] == ["joint"]
    assert report["check"]["pass"] and report["check"]["rel_diff_graphs_vs_eager"] == 0.0
    assert "| fp32+graphs+cl |" in done.stdout
    profiles = {p.name: p.read_text() for p in (tmp_path / "prof").iterdir()}
    assert set(profiles) == {"profile_fp32.txt", "profile_fp32+graphs+cl.txt"}
    assert all("aten::convolution" in t and "Self CPU" in t for t in profiles.values())
    bad = run_script(["bench.py", "train-step", "--device", "cpu", "--variants", "fp16", "--steps", "1", "--windows", "1"])
    assert bad.returncode == 1 and "bad variant 'fp16'" in bad.stdout + bad.stderr


def test_bench_preset_trains_verifies_and_reports_next_to_the_paper(tmp_path):
    """bench.py preset with tiny sizes: every file, the measured figures next to the paper's; and a
    --train-timeout interrupts train.py, which saves, and what it saved is verified."""
    need_shared()
    tiny = ["--", "--model", "dm-small", "--train-n", "384", "--batch-size", "64", "--test-n", "100"]
    common = ["bench.py", "preset", "--data", str(DATA), "--device", "cpu", "--verify-args", "--n 100 --pgd-steps 5"]
    done = run_script(common + ["--out", str(tmp_path / "a")] + tiny + ["--epochs", "2"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"train.log", "train_log.jsonl", "verify.log", "verify.json", "preset.json", "preset.md"} <= files
    report = json.loads((tmp_path / "a" / "preset.json").read_text())
    assert report["train_status"] == 0 and report["epochs_done"] == report["epochs"] == 2
    assert report["paper"] == {"clean_err": 1.90, "pgd_err": 2.87, "verified_err": 6.60}
    assert report["measured"]["n"] == 100 and 0 <= report["measured"]["ibp_verified_err"] <= 100
    assert "| paper (Fan & Li 2021) | 1.90 | 2.87 | 6.60 |" in (tmp_path / "a" / "preset.md").read_text()
    # 15 s: past torch's import even on a loaded machine (a SIGINT during the import was lost; seen at 4 s)
    cut = run_script(common + ["--out", str(tmp_path / "b"), "--train-timeout", "15"] + tiny + ["--epochs", "400", "--allow-collapse"])
    report = json.loads((tmp_path / "b" / "preset.json").read_text())
    assert report["train_status"] == 130 and 0 < report["epochs_done"] < 400, cut.stdout[-2000:]
    assert report["verify_status"] == 0 and "measured" in report


def test_gpu_run_dry_run_benchmarks_picks_flags_trains_and_verifies(tmp_path):
    """bench.py gpu-run --tiny: the whole GPU driver on the CPU. The flags it picks follow its own
    benchmark (channels_last only where it measured faster), and every file lands in --out."""
    need_shared()
    done = run_script(["bench.py", "gpu-run", "--out", str(tmp_path), "--data", str(DATA), "--tiny", "--budget", "300"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    bench = json.loads((tmp_path / "bench_step.json").read_text())
    ms = {r["variant"]: r["ms"] for r in bench["rows"]}
    assert set(ms) == {"tf32", "tf32+cl"} and bench["check"]["pass"]
    report = json.loads((tmp_path / "preset" / "preset.json").read_text())
    assert ("--channels-last" in report["train_command"]) == (ms["tf32+cl"] < ms["tf32"])
    assert "--no-cuda-graphs" in report["train_command"] and "--clean-n 64" in report["train_command"]
    assert report["train_status"] == 0 and report["measured"]["n"] == 200


def test_gpu_run_skip_bench_trains_with_graphs_and_channels_last_flags(tmp_path):
    """--skip-bench: no benchmark, the preset straight away with channels_last (and graphs, off on the
    CPU dry run), verified with PGD searched in TF32."""
    need_shared()
    done = run_script(["bench.py", "gpu-run", "--out", str(tmp_path), "--data", str(DATA), "--tiny", "--skip-bench"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert not (tmp_path / "bench_step.json").exists()
    report = json.loads((tmp_path / "preset" / "preset.json").read_text())
    assert "--channels-last" in report["train_command"] and "--no-cuda-graphs" in report["train_command"]
    assert "--pgd-precision tf32" in report["verify_command"] and report["verify_status"] == 0


def test_cuda_graphs_without_a_gpu_fail_clearly(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert in_process(SMALL + ["--out", str(tmp_path), "--cuda-graphs", "--device", "cpu"]) == 1
    assert "--cuda-graphs needs a GPU" in capsys.readouterr().err


def test_save_every_keeps_fewer_checkpoints_and_resume_still_matches(tmp_path):
    args = SMALL + ["--epochs", "4"]
    assert in_process(args + ["--out", str(tmp_path / "a")]) == 0
    assert in_process(args + ["--out", str(tmp_path / "b"), "--save-every", "3", "--stop-after", "2"]) == 0
    assert train.load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 2  # --stop-after saves regardless
    assert in_process(args + ["--out", str(tmp_path / "b"), "--save-every", "3", "--resume"]) == 0
    a, b = (train.load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert a["epoch"] == b["epoch"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_ctrl_c_on_an_epochs_last_step_saves_too(tmp_path, monkeypatch):
    """An interrupt that lands on the last step of an epoch saves that epoch, whatever --save-every says."""
    batch = train.Run.batch

    def interrupted_at_the_end_of_epoch_1(self):
        if self.step == self.spe - 1:
            self.stop["now"] = True  # what the SIGINT handler does
        return batch(self)
    monkeypatch.setattr(train.Run, "batch", interrupted_at_the_end_of_epoch_1)
    out = tmp_path / "r"
    assert in_process(SMALL + ["--out", str(out), "--save-every", "5"]) == 130
    ck = train.load_checkpoint(out / "last.pt")
    assert (ck["step"], ck["epoch"]) == (6, 1)


def test_ctrl_c_saves_mid_epoch_and_resume_finishes(tmp_path):
    need_shared()
    args = [*SMALL, "--train-n", "8192", "--out", str(tmp_path / "i"), "--progress", "0.2"]  # 128 steps/epoch
    proc = subprocess.Popen([sys.executable, "train.py", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=Path(__file__).resolve().parent)
    for line in proc.stdout:  # interrupt inside the second epoch
        if line.startswith("  epoch 2: step"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 130 and "interrupted: saved" in rest, rest[-2000:]
    ck = train.load_checkpoint(tmp_path / "i" / "last.pt")
    assert 128 < ck["step"] < 256
    assert in_process([*args, "--resume"]) == 0
    assert train.load_checkpoint(tmp_path / "i" / "last.pt")["step"] == 256


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "n")
    assert in_process(SMALL + ["--out", out, "--stop-after", "1"]) == 0
    before = (tmp_path / "n" / "last.pt").read_bytes()
    real = certmin.verified_loss
    monkeypatch.setattr(certmin, "verified_loss", lambda *a, **k: (real(*a, **k)[0] * math.nan, real(*a, **k)[1]))
    assert in_process(SMALL + ["--out", out, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 2, step 6" in err and "intact" in err
    assert (tmp_path / "n" / "last.pt").read_bytes() == before


def test_a_collapse_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A run made to collapse on purpose: one epoch of natural training at a sane rate (train error
    ~0.46), then Adam at lr 1, which drives dm-small to chance-level predictions in the next epoch."""
    real = train.schedule

    def sabotaged(cfg, e):
        s = real(cfg, e)
        if e < 1:
            s.update(phase="natural", lr=3e-3)
        else:
            s["lr"] = 1.0
        return s
    monkeypatch.setattr(train, "schedule", sabotaged)
    args = [*SMALL, "--epochs", "3", "--train-n", "1024", "--test-n", "100"]
    assert in_process([*args, "--out", str(tmp_path / "c")]) == 3
    err = capsys.readouterr().err
    assert "training collapsed in epoch 2 (joint-final)" in err and "is at chance (0.90)" in err, err
    assert "last.pt still holds step 16 (epoch 1), the last good one" in err and "--epochs" in err
    good, bad = (train.load_checkpoint(tmp_path / "c" / name) for name in ("last.pt", "collapsed.pt"))
    assert (good["epoch"], good["step"], bad["epoch"], bad["step"]) == (1, 16, 2, 32)
    assert good["clean_err_history"][0] < 0.5
    log = [json.loads(line) for line in open(tmp_path / "c" / "log.jsonl")]
    assert [r["collapse"] is not None for r in log] == [False, True] and log[1]["clean_err"] > 0.85
    # --allow-collapse trains on to the end
    assert in_process([*args, "--out", str(tmp_path / "a"), "--allow-collapse"]) == 0
    assert train.load_checkpoint(tmp_path / "a" / "last.pt")["epoch"] == 3
    assert "warning: training collapsed in epoch 2" in capsys.readouterr().err


def test_collapse_rule():
    assert train.collapse_reason(0.88, [0.6, 0.3], 10).startswith("train clean error 0.880 is at chance")
    assert train.collapse_reason(0.88, [0.9, 0.87], 10) is None  # never low: a run that has not learnt yet
    assert train.collapse_reason(0.71, [0.3, 0.21], 10) == "train clean error rose from 0.210 to 0.710 in one epoch"
    assert train.collapse_reason(0.30, [0.3, 0.21], 10) is None and train.collapse_reason(0.9, [], 10) is None


def test_progress_line_estimates_the_time_left(tmp_path, capsys):
    assert in_process([*SMALL, "--out", str(tmp_path / "p"), "--progress", "1e-6", "--stop-after", "1"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  epoch 1: step 3/6")]
    assert len(lines) == 1 and re.search(r"; [a-z-]+ at \d+\.\d{3} s/step: the epoch ends in \d+s and the run in \d+s"
                                         r"( \(assumed for phases not yet run here: .*\))?$", lines[0])
    assert [train.duration(s) for s in (5, 130, 7300, 4e6)] == ["5s", "2m", "2.0h", "46.3d"]


@pytest.mark.parametrize("eps,message", [("8/0", "fraction like 8/255"), ("abc", "fraction like 8/255"),
                                         ("-0.1", ">= 0"), ("nan", ">= 0")])
def test_bad_eps_is_refused_clearly(eps, message, capsys):
    with pytest.raises(SystemExit) as e:
        in_process(["--dataset", "mnist", "--eps", eps])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_explains_the_options(capsys):
    for main, options in [(train.main, ["--dataset", "--eps", "--method", "--weights", "--epochs", "--resume",
                                        "--val-split", "--amp", "--data", "torchrun"]),
                          (verify.main, ["--eps-sweep", "--methods", "--pgd-steps", "--restarts", "--pgd-precision", "--seed", "--dtype",
                                          "--json"])]:
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and all(o in out for o in options)


def test_bad_dataset_data_folder_and_checkpoint_fail_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        in_process(["--dataset", "imagenet", "--eps", "0.1"])
    assert e.value.code == 2 and "invalid choice: 'imagenet'" in capsys.readouterr().err
    assert in_process(["--dataset", "mnist", "--eps", "0.1", "--data", str(tmp_path / "nowhere"),
                       "--no-download", "--out", str(tmp_path / "o")]) == 1
    assert "MNIST not found under" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "last.pt").write_bytes(b"not a checkpoint")
    assert in_process(SMALL + ["--out", str(tmp_path / "c"), "--resume"]) == 1
    assert "is not a readable checkpoint" in capsys.readouterr().err
    assert in_process(SMALL + ["--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A run is never lost, and bad input is named: one test per way a user can go wrong
# ---------------------------------------------------------------------------------------------

def md5(path):
    return train._md5(path)


def test_an_existing_run_is_refused_and_kept_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert in_process(SMALL + ["--out", str(out), "--stop-after", "1"]) == 0
    (out / "collapsed.pt").write_bytes((out / "last.pt").read_bytes())  # a stale file of an earlier run
    before, log = md5(out / "last.pt"), (out / "log.jsonl").read_text()
    capsys.readouterr()
    assert in_process(SMALL + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "already holds a run (last.pt at epoch 1 of 2 (step 6), advibp dm-small on mnist" in err
    assert "--resume" in err and "another --out" in err and "--overwrite" in err
    assert md5(out / "last.pt") == before and (out / "log.jsonl").read_text() == log
    assert in_process(SMALL + ["--out", str(out), "--overwrite", "--epochs", "1"]) == 0  # starts afresh
    assert not (out / "collapsed.pt").exists()
    assert [json.loads(line)["epoch"] for line in open(out / "log.jsonl")] == [1]
    with pytest.raises(SystemExit) as e:
        in_process(SMALL + ["--out", str(out), "--overwrite", "--resume"])
    assert e.value.code == 2


def test_resume_refuses_options_that_contradict_the_checkpoint_and_says_a_run_is_finished(tmp_path, capsys):
    out = tmp_path / "run"
    assert in_process(SMALL + ["--out", str(out)]) == 0
    before, log = md5(out / "last.pt"), (out / "log.jsonl").read_text()
    capsys.readouterr()
    for extra, named in ((["--model", "dm-medium"], "--model dm-medium (the checkpoint has dm-small)"),
                         (["--epochs", "3"], "--epochs 3 (the checkpoint has 2)")):
        argv = [a for a in SMALL if a not in ("--epochs", "2")] if "--epochs" in extra else SMALL
        assert in_process(argv + extra + ["--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --resume continues the run as it was started") and named in err
    assert in_process(SMALL + ["--out", str(out), "--resume", "--eval-every", "2"]) == 0  # run-time options may change
    assert "is a finished run (epoch 2 of 2): nothing to train" in capsys.readouterr().out
    assert md5(out / "last.pt") == before and (out / "log.jsonl").read_text() == log


@pytest.mark.parametrize("case", ["file", "under-a-file", "proc", "unwritable"])
def test_an_unusable_output_folder_is_named_before_anything_is_read(tmp_path, capsys, monkeypatch, case):
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under-a-file": tmp_path / "f" / "run", "proc": Path("/proc/certmin-run"),
           "unwritable": tmp_path / "ro"}[case]
    if case == "unwritable":  # as root, chmod does not stop a write: make the write itself fail
        def refuse(self, data):
            raise PermissionError(13, "Permission denied", str(self))
        monkeypatch.setattr(Path, "write_bytes", refuse)
    monkeypatch.setattr(train, "load_data", lambda *a, **k: pytest.fail("the data was read before the folder"))
    assert in_process(SMALL + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the output folder {out}: ") and err.count("\n") == 1
    assert {"file": "it is a file", "under-a-file": "Not a directory", "unwritable": "Permission denied"}.get(
        case, "") in err


def test_a_failed_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert in_process(SMALL + ["--out", str(out), "--stop-after", "1"]) == 0
    before = md5(out / "last.pt")
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # the bytes go out, then the disk is full
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file: No space left")
    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    assert in_process(SMALL + ["--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"error: could not save {out / 'last.pt'} (" in err and "the previous last.pt is intact" in err
    assert md5(out / "last.pt") == before and not list(out.glob("*.tmp"))


def mnist_copy(tmp_path):
    need_shared()
    root = tmp_path / "data"
    shutil.copytree(DATA / "mnist", root / "mnist")
    return root


def gz(data):
    import gzip
    return gzip.compress(data, compresslevel=1)


@pytest.mark.parametrize("damage", ["half-the-labels", "truncated-gz", "random-bytes", "short-images", "bad-magic"])
def test_damaged_mnist_files_are_named_with_the_fix(tmp_path, damage):
    import gzip
    root = mnist_copy(tmp_path)
    labels, images = root / "mnist" / "train-labels-idx1-ubyte.gz", root / "mnist" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    target = labels
    if damage == "half-the-labels":  # a valid file, header and all, of 30 000 labels
        labels.write_bytes(gz(raw[:4] + (30000).to_bytes(4, "big") + raw[8:8 + 30000]))
        expect = "30000 items where MNIST's train split has 60000; to train on fewer images on purpose"
    elif damage == "truncated-gz":
        labels.write_bytes(labels.read_bytes()[:1000])
        expect = "EOFError"
    elif damage == "random-bytes":
        labels.write_bytes(os.urandom(5000))
        expect = "BadGzipFile"
    elif damage == "short-images":  # gzip-valid, the header promises more than the file holds
        target = images
        images.write_bytes(gz(gzip.decompress(images.read_bytes())[:16 + 784 * 100]))
        expect = "its header promises 60000 items, the file holds 78400 bytes"
    else:
        labels.write_bytes(gz(b"\x00\x00\x08\x03" + raw[4:]))
        expect = "not an IDX file with magic number 2049"
    with pytest.raises(train.DataError) as e:
        train.load_data("mnist", root, download=False)
    msg = str(e.value)
    assert msg.startswith(f"{target} is damaged (") and expect in msg
    assert "delete it to download it again, or replace it" in msg


def test_damaged_cifar_batches_are_named_with_the_fix(tmp_path):
    need_shared()
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in train.CIFAR_FILES:
        (root / name).symlink_to(DATA / "cifar10" / "cifar-10-batches-py" / name)
    (root / "test_batch").unlink()
    (root / "test_batch").write_bytes((DATA / "cifar10" / "cifar-10-batches-py" / "test_batch").read_bytes()[:100000])
    with pytest.raises(train.DataError, match=r"test_batch is damaged \(UnpicklingError|test_batch is damaged \(EOFError"):
        train.load_data("cifar", tmp_path, download=False, test_only=True)
    import pickle
    (root / "test_batch").unlink()
    with open(root / "test_batch", "wb") as f:
        pickle.dump({"data": __import__("numpy").zeros((10, 3072), "uint8"), "labels": [0] * 10}, f)
    with pytest.raises(train.DataError, match="10 labels where a CIFAR-10 batch holds 10000 of each.*delete it"):
        train.load_data("cifar", tmp_path, download=False, test_only=True)


def test_damaged_training_data_stops_train_py_with_one_line(tmp_path, capsys):
    import gzip
    root = mnist_copy(tmp_path)
    labels = root / "mnist" / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gz(raw[:4] + (30000).to_bytes(4, "big") + raw[8:8 + 30000]))
    argv = [a if a != str(DATA) else str(root) for a in SMALL]
    assert in_process(argv + ["--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {labels} is damaged") and err.count("\n") == 1
    assert not (tmp_path / "run" / "log.jsonl").exists()


def progress_lines(monkeypatch, capsys, cfg, spe, start, steps, pace, phase):
    """Progress over `steps` steps from step `start` at `pace` seconds a step, on a clock we control."""
    clock = {"t": 1000.0}
    monkeypatch.setattr(train.time, "time", lambda: clock["t"])
    p = train.Progress(cfg, spe, every=pace / 2)
    capsys.readouterr()
    for step in range(start + 1, start + steps + 1):
        clock["t"] += pace
        p.tick(step, phase)
    return capsys.readouterr().err.strip().splitlines(), p


def test_progress_paces_the_steps_this_process_ran_and_costs_the_phases_ahead(monkeypatch, capsys):
    cfg = config("--dataset", "mnist", "--eps", "0.3", "--epochs", "20")  # 2 natural, 6 adv-warmup, ...
    spe = 100
    # resumed at step 1530 (epoch 16, 30 steps into it), in joint-final, at 1.7 s a step
    lines, _ = progress_lines(monkeypatch, capsys, cfg, spe, 1530, 40, 1.7, "joint-final")
    assert lines and all("joint-final at 1.700 s/step" in line for line in lines)
    last = lines[-1]
    assert "step 70/100" in last and "the epoch ends in 51s" in last  # 30 steps left
    assert "the run in 12m" in last  # 430 steps x 1.7 s = 731 s
    # at the start of the adversarial warm-up: the phases ahead cost more than this one
    lines, p = progress_lines(monkeypatch, capsys, cfg, spe, 300, 10, 0.085, "adv-warmup")
    left, assumed = p.time_left(310, "adv-warmup")
    cost = train.PHASE_COST
    joint_pace = 0.085 * cost["joint"] / cost["adv-warmup"]
    assert left > (2000 - 310) * 0.085 * 1.5 and any(a.startswith(f"joint {joint_pace:.3f}") for a in assumed)
    assert "assumed for phases not yet run here: joint " in lines[-1] and "joint-final" in lines[-1]


def test_verify_finds_the_runs_data_reads_only_the_test_split_and_takes_a_run_folder(small_checkpoint, tmp_path,
                                                                                    capsys, monkeypatch):
    need_shared()
    test_only = tmp_path / "data" / "mnist"
    test_only.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (test_only / name).symlink_to(DATA / "mnist" / name)
    ck = train.load_checkpoint(small_checkpoint)
    ck["config"]["data"] = str(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ck, run / "last.pt")
    monkeypatch.chdir(tmp_path)  # no ./data here
    assert verify.main([str(run), "--no-download", "--n", "20", "--pgd-steps", "2", "--methods", "ibp"]) == 0
    assert f"{run / 'last.pt'}: advibp dm-small" in capsys.readouterr().out


def test_verify_says_how_to_certify_a_model_it_did_not_train(small_checkpoint, tmp_path, capsys):
    torch.save(train.load_checkpoint(small_checkpoint)["model"], tmp_path / "state_dict.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(3000))
    for name, expect in (("state_dict.pt", "is not a train.py checkpoint"), ("junk.pt", "is not a readable checkpoint")):
        assert verify.main(verify_args(tmp_path / name)) == 1
        err = capsys.readouterr().err
        assert expect in err and "certmin.sound_bounds(model, xl, xu, C, 'ibp')" in err
        assert "weights_only" not in err and err.count("\n") == 1
    assert verify.main(verify_args(tmp_path / "nowhere")) == 1
    assert f"no checkpoint at {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_bench_passes_a_childs_error_through(tmp_path):
    (tmp_path / "junk.pt").write_bytes(os.urandom(3000))
    r = run_script(["bench.py", "verify", str(tmp_path / "junk.pt"), "--methods", "ibp", "--n", "10"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'junk.pt'} is not a readable checkpoint")


@pytest.mark.parametrize("dataset,eps", [("mnist", "0.3"), ("cifar", "8/255")])
def test_bench_step_phases_come_from_the_datasets_own_preset(dataset, eps):
    cfg = config("--dataset", dataset, "--eps", eps)
    for phase in bench.PHASES:
        assert train.schedule(cfg, bench.phase_epoch(cfg, phase))["phase"] == phase
    assert train.schedule(cfg, bench.phase_epoch(cfg, "joint-final"))["c_t"] == 0


def test_logs_and_reports_are_strict_json(small_checkpoint, tmp_path):
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert in_process(SMALL + ["--method", "natural", "--epochs", "1", "--out", str(tmp_path / "nat")]) == 0
    records = [strict(line) for line in (tmp_path / "nat" / "log.jsonl").read_text().splitlines()]
    assert records[0]["k_adv"] is None  # a figure natural training does not have: null, not NaN
    assert train.strict_json({"a": math.nan, "b": [math.inf, 1.0]}) == '{"a": null, "b": [null, 1.0]}'
    assert verify.main(verify_args(small_checkpoint, "--n", "20", "--json", str(tmp_path / "v.json"))) == 0
    strict((tmp_path / "v.json").read_text())


def test_specifications_with_bad_labels_or_class_counts_are_named():
    with pytest.raises(ValueError, match=r"labels in \[0, 10\), got 10 \(1 of 2 out of range\)"):
        certmin.margin_spec(torch.tensor([10, 1]), 10)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 1, 2, 2)
    C = certmin.margin_spec(torch.tensor([0, 1]), 10)
    for f in (certmin.bounds, certmin.sound_bounds):
        with pytest.raises(ValueError, match=r"C must be \(examples, specifications, classes\) = \(2, S, 3\).*got \(2, 9, 10\)"):
            f(net, x, x + 0.1, C)


def test_readme_test_command_shows_skip_reasons():
    readme = (Path(__file__).resolve().parent / "README.md").read_text()
    ci = (Path(__file__).resolve().parent / ".ci" / "run").read_text()
    command = "python -m pytest -q -rs test_certmin.py test_scripts.py"
    assert command in readme and command in ci


def test_readme_library_snippet_runs_as_written(capsys):
    readme = (Path(__file__).resolve().parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, "README should hold exactly one python snippet"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.fullmatch(r"certified: \[(True|False)(, (True|False)){7}\]\n", out), out


def test_code_and_readme_give_reasons_not_history():
    """No commit ids, dates, issue numbers or files outside the repository in the code and README
    (the notebook in results/ cites commits as provenance)."""
    root = Path(__file__).resolve().parent
    found = []
    for name in ("certmin.py", "train.py", "verify.py", "bench.py", "test_certmin.py", "test_scripts.py",
                 "README.md", ".ci/run"):
        for i, line in enumerate((root / name).read_text().splitlines(), 1):
            commits = [w for w in re.findall(r"\b[0-9a-f]{7,12}\b", line)
                       if re.search(r"[a-f]", w) and re.search(r"[0-9]", w)]
            if commits or re.search(r"\b[Ii]ssue \d+|\b20\d\d-\d\d-\d\d\b|method\.md|authors-code\.md", line):
                found.append(f"{name}:{i}: {line.strip()[:80]}")
    assert not found, "\n".join(found)


def test_torchrun_two_gloo_processes_keep_identical_parameters(tmp_path):
    r = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *SMALL,
                    "--device", "cpu", "--out", str(tmp_path / "d")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all 2 ranks hold identical parameters" in r.stdout
    assert len(open(tmp_path / "d" / "log.jsonl").readlines()) == 2  # rank 0 alone writes


# ----------------------------------------------------------------------------------------------
# verify.py
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert in_process(SMALL + ["--out", str(out)]) == 0
    return out / "last.pt"


def test_crown_certifies_what_textbook_crown_does_on_a_train_py_network(small_checkpoint):
    ck = train.load_checkpoint(small_checkpoint)
    net = train.build_model(ck["config"])
    net.load_state_dict(ck["model"])
    torch.manual_seed(0)
    crown_keeps_textbook_certificates(net, *mnist_test(30), 0.001)


def verify_args(ck, *extra):
    return [str(ck), "--data", str(DATA), "--no-download", "--n", "200", "--pgd-steps", "10", *extra]


def test_verify_agrees_with_certmin_and_writes_every_field(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "v.json"
    assert verify.main(verify_args(small_checkpoint, "--eps", "0.02", "--json", str(out))) == 0
    printed = capsys.readouterr().out
    assert "| eps | clean | PGD | ibp verified | crown-ibp verified | best verified |" in printed
    d = json.load(open(out))
    assert {"checkpoint", "config", "methods", "dtype", "device", "pgd_steps", "restarts", "rows",
            "certified_but_attacked"} <= set(d)
    r = d["rows"][0]
    assert {"eps", "n", "clean_err", "pgd_err", "verified_err", "best_verified_err", "seconds",
            "certified_but_attacked"} <= set(r)
    assert set(r["verified_err"]) == {"ibp", "crown-ibp"} and r["n"] == 200 and d["certified_but_attacked"] == 0
    ck = train.load_checkpoint(small_checkpoint)
    model = train.build_model(ck["config"])
    model.load_state_dict(ck["model"])
    x, y = mnist_test(200)
    with torch.no_grad():
        clean = (model(x).argmax(1) != y).float().mean().item()
        verified = certmin.verified_loss(model, x, y, 0.02)[1]
    assert r["clean_err"] == pytest.approx(clean) and r["verified_err"]["ibp"] == pytest.approx(1 - verified.float().mean().item())
    assert r["pgd_err"] >= r["clean_err"] and r["best_verified_err"] <= min(r["verified_err"].values())
    assert r["best_verified_err"] >= r["pgd_err"]  # every certified example survived PGD


def test_verify_pgd_searches_in_bf16_and_judges_in_float32(small_checkpoint, tmp_path, monkeypatch):
    """--pgd-precision bf16: PGD's passes run under bf16 autocast, every other pass of the model (the
    clean figure, the judgement of PGD's points, the bounds) in float32; --seed repeats the report."""
    seen, inside, pgd, watched = [], [False], certmin.pgd, set()

    def spy(model, *a, **kw):  # from PGD's first pass on, record every pass of the model: inside PGD or not
        if id(model) not in watched:
            watched.add(id(model))
            model.register_forward_hook(lambda m, i, o: seen.append((inside[0], o.dtype)))
        inside[0] = True
        try:
            return pgd(model, *a, **kw)
        finally:
            inside[0] = False
    monkeypatch.setattr(certmin, "pgd", spy)
    reports = []
    for name, precision in [("a", "bf16"), ("b", "bf16"), ("c", "fp32")]:
        out = tmp_path / f"{name}.json"
        assert verify.main(verify_args(small_checkpoint, "--eps", "0.02", "--pgd-precision", precision, "--seed", "3",
                                       "--json", str(out))) == 0
        reports.append(json.load(open(out)))
    assert {dt for inner, dt in seen if inner} == {torch.bfloat16, torch.float32}  # bf16 runs, then the fp32 one
    assert reports[0]["pgd_precision"] == "bf16" and reports[0]["seed"] == 3
    strip = lambda r: {k: v for k, v in r["rows"][0].items() if k != "seconds"}  # noqa: E731
    assert strip(reports[0]) == strip(reports[1])  # same seed, same report
    r = reports[0]["rows"][0]
    assert r["clean_err"] <= r["pgd_err"] <= r["best_verified_err"] and reports[0]["certified_but_attacked"] == 0
    ck = train.load_checkpoint(small_checkpoint)
    model = train.build_model(ck["config"])
    model.load_state_dict(ck["model"])
    x, y = mnist_test(200)
    assert [dt for inner, dt in seen if not inner] == [torch.float32] * 3  # each run judged PGD's points in float32
    assert not autocast_on("cpu")
    with torch.no_grad():
        clean = (model(x).argmax(1) != y).float().mean().item()
    assert r["clean_err"] == pytest.approx(clean)


def float32_false_certificate(method="ibp"):
    """A network and box whose margin bound (by method) is positive in float32 and not in float64: large
    weights, and the class bias moved so that the exact bound is about -1e-7 of its size."""
    for seed in range(50):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(300)
        x, y = torch.rand(1, 1, 4, 4), torch.tensor([0])
        C, (xl, xu) = certmin.margin_spec(y, 2), certmin.input_box(x, 0.01)
        exact = lambda n: certmin.bounds(copy.deepcopy(n).double(), xl.double(), xu.double(), C.double(),  # noqa: E731
                                         method)[0].item()
        with torch.no_grad():
            net[3].bias[0] -= exact(net) * (1 + 1e-7)
        if certmin.bounds(net, xl, xu, C, method)[0].item() > 0 >= exact(net):
            return net, xl, xu, C
    raise AssertionError("no float32 false certificate among 50 seeds")


@pytest.mark.parametrize("method", certmin.SOUND_METHODS)
def test_verify_certificates_hold_in_exact_arithmetic_without_a_recheck(method):
    """verify.py certifies with sound_bounds: float32's false certificate is refused outright; with a
    comfortable margin it certifies, and (IBP) the exact bound is positive."""
    from fractions import Fraction as Q
    net, xl, xu, C = float32_false_certificate(method)
    assert verify.certified_exactly(net, xl, xu, C, method).tolist() == [False]
    with torch.no_grad():
        net[3].bias[0] += 1e-3 * net[3].bias[0].abs() + 1e-3
    assert verify.certified_exactly(net, xl, xu, C, method).tolist() == [True]
    assert method != "ibp" or exact_ibp(net, xl[0], xu[0], C[0])[0][0] > Q(0)


def test_verify_alpha_crown_and_crown_on_a_trained_checkpoint(small_checkpoint, tmp_path):
    out = tmp_path / "a.json"
    assert verify.main(verify_args(small_checkpoint, "--eps", "0.001", "--methods", "ibp,crown,alpha-crown",
                                   "--alpha-steps", "5", "--n", "100", "--json", str(out))) == 0
    r = json.load(open(out))["rows"][0]
    err = r["verified_err"]  # this barely trained net: IBP certifies nothing at 0.001, CROWN what it classifies right
    assert err["alpha-crown"] <= err["crown"] < err["ibp"] and r["best_verified_err"] == err["alpha-crown"]
    assert "float64_rechecked" not in r and json.load(open(out))["exact_arithmetic"] == ["ibp", "crown", "alpha-crown"]
    assert r["certified_but_attacked"] == 0


def test_verify_eps_sweep_gives_one_row_per_eps(small_checkpoint, tmp_path):
    out = tmp_path / "s.json"
    assert verify.main(verify_args(small_checkpoint, "--eps-sweep", "0,1/255,0.3", "--methods", "ibp",
                                   "--json", str(out))) == 0
    rows = json.load(open(out))["rows"]
    assert [r["eps"] for r in rows] == pytest.approx([0, 1 / 255, 0.3])
    errs = [r["verified_err"]["ibp"] for r in rows]
    assert errs == sorted(errs) and errs[0] == pytest.approx(rows[0]["clean_err"])


def test_verify_reports_certified_but_attacked_examples(small_checkpoint, tmp_path, monkeypatch, capsys):
    """The consistency check can fail: an unsound 'bound' (lb shifted up) must be caught."""
    real, real_sound = certmin.bounds, certmin.sound_bounds
    monkeypatch.setattr(certmin, "bounds", lambda *a, **k: tuple(b + 100 for b in real(*a, **k)))
    monkeypatch.setattr(certmin, "sound_bounds", lambda *a, **k: tuple(b + 100 for b in real_sound(*a, **k)))
    out = tmp_path / "bad.json"
    assert verify.main(verify_args(small_checkpoint, "--methods", "ibp", "--json", str(out))) == 1
    assert "SOUNDNESS BUG" in capsys.readouterr().err
    assert json.load(open(out))["certified_but_attacked"] > 0


def test_verify_refuses_bad_checkpoints_and_eps(small_checkpoint, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    assert verify.main(verify_args(junk)) == 1
    assert "not a readable checkpoint" in capsys.readouterr().err
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(small_checkpoint.read_bytes()[:5000])
    assert verify.main(verify_args(truncated)) == 1
    assert "not a readable checkpoint" in capsys.readouterr().err
    torch.save({"weights": 1}, tmp_path / "other.pt")
    assert verify.main(verify_args(tmp_path / "other.pt")) == 1
    assert "not a train.py checkpoint" in capsys.readouterr().err
    for bad in (["--eps", "8/0"], ["--eps-sweep", "0.1,abc"], ["--methods", "ibp,lp"]):
        with pytest.raises(SystemExit) as e:
            verify.main(verify_args(small_checkpoint, *bad))
        assert e.value.code == 2
    assert "fraction like 8/255" in capsys.readouterr().err


def test_bench_verify_reports_time_and_error_per_method(small_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    r = run_script(["bench.py", "verify", str(small_checkpoint), "--methods", "ibp,crown", "--n", "12", "--batch-size",
                    "6", "--eps", "0.001", "--data", str(DATA), "--json", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| method | time / image | verified error |" in r.stdout and "| crown | " in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["method"] for row in rows] == ["ibp", "crown"] and all(row["n"] == 12 for row in rows)
    assert all(row["seconds_per_image"] > 0 and 0 <= row["verified_err"] <= 1 for row in rows)
    assert rows[1]["verified_err"] <= rows[0]["verified_err"]  # CROWN certifies what IBP does here, and more


def test_bench_rounding_reports_float32_error_per_net_and_method(small_checkpoint, tmp_path):
    out = tmp_path / "r.json"
    r = run_script(["bench.py", "rounding", str(SHARED / "models" / "kw_mnist.pth"), str(small_checkpoint), "--n", "10",
                    "--crown-n", "3", "--data", str(DATA), "--json", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(Path(row["net"]).name, row["method"], row["n"]) for row in rows] == [
        (name, m, n) for name in ("kw_mnist.pth", small_checkpoint.name) for m, n in (("ibp", 10), ("crown-ibp", 10), ("crown", 3))]
    assert all(0 < row["max_rel"] < 1e-3 and row["refuted64"] == 0 and row["sound_max_widening"] < 1e-6 for row in rows)
    assert all(row["certified_sound"] <= n for row, n in zip(rows, [10, 10, 3] * 2))
    assert "| kw_mnist | 0.1000 | crown | 3 |" in r.stdout
    bad = run_script(["bench.py", "rounding", str(tmp_path / "none.pt"), "--data", str(DATA)])
    assert bad.returncode == 2 and "no checkpoint at" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_schedule_collects_runs_and_reports(small_checkpoint, tmp_path):
    run = small_checkpoint.parent
    assert verify.main(verify_args(small_checkpoint, "--methods", "ibp,crown", "--n", "20", "--json",
                                   str(run / "verify.json"))) == 0
    r = run_script(["bench.py", "schedule", str(run), "--out", str(tmp_path / "fs")])
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((tmp_path / "fs.json").read_text())
    (entry,) = d["runs"]
    report = json.loads((run / "verify.json").read_text())["rows"][0]
    assert entry["method"] == "advibp" and entry["epochs_done"] == entry["epochs"] == 2
    assert [c["epoch"] for c in entry["curve"]] == [1, 2] and entry["verify"]["rows"][0] == report
    table = (tmp_path / "fs.md").read_text()
    assert f"| advibp seed 0 | 2/2 | {100 * report['clean_err']:.2f} |" in table and "1.9 / 2.87 / 6.6" in table
    assert "(ibp and crown certificates in exact arithmetic (certmin.sound_bounds));" in table
    best = min(entry["curve"], key=lambda e: e["test_ibp_verified_err"])  # the authors' selection, labelled
    assert "best test epoch (the authors' selection)" in table
    assert f"| {100 * best['test_ibp_verified_err']:.2f} (epoch {best['epoch']}) |" in table
    missing = run_script(["bench.py", "schedule", str(tmp_path), "--out", str(tmp_path / "x")])
    assert missing.returncode == 2 and "has no log.jsonl" in missing.stderr
    ablation = tmp_path / "sum"  # the same run, as if trained with --weights sum: named so, no paper figures
    ablation.mkdir()
    (ablation / "verify.json").write_text((run / "verify.json").read_text())
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    (ablation / "log.jsonl").write_text("".join(json.dumps({**e, "config": {**e["config"], "weights": "sum"}}) + "\n"
                                                for e in rows))
    r = run_script(["bench.py", "schedule", str(run), str(ablation), "--out", str(tmp_path / "ab")])
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "ab.md").read_text()
    assert "| advibp seed 0 | 2/2 |" in table and "1.9 / 2.87 / 6.6" in table
    assert "| advibp --weights sum seed 0 | 2/2 |" in table and table.count("1.9 / 2.87 / 6.6") == 1
    old = {k: v for k, v in json.loads((run / "verify.json").read_text()).items() if k != "exact_arithmetic"}
    (ablation / "verify.json").write_text(json.dumps(old))  # a report from before sound_bounds
    r = run_script(["bench.py", "schedule", str(run), str(ablation), "--out", str(tmp_path / "ab")])
    assert "ibp and crown certificates in exact arithmetic for " in (tmp_path / "ab.md").read_text()
    assert "the others confirmed in float64" in (tmp_path / "ab.md").read_text()


# ---------------------------------------------------------------------------------------------
# The study runner (bench.py study): table, JSON, resume
# ---------------------------------------------------------------------------------------------


def test_study_runner_writes_table_json_and_resumes(tmp_path):
    out = tmp_path / "results"
    args = ["bench.py", "study", "--rows", "advibp,natural", "--seeded", "natural", "--seeds", "0,1", "--epochs", "1",
            "--train-n", "256", "--n-test", "20", "--data", str(DATA), "--out", str(out)]
    first = run_script(args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("== run ") == 3  # natural with both seeds, advibp with the first only
    study = json.loads((out / "study.json").read_text())
    assert [(r["row"], r["seed"]) for r in study["runs"]] == [("advibp", 0), ("natural", 0), ("natural", 1)]
    for r in study["runs"]:
        report = json.loads((out / "study" / f"{r['row']}-seed{r['seed']}" / "verify.json").read_text())["rows"][0]
        assert r["clean_err"] == report["clean_err"] and r["ibp_err"] == report["verified_err"]["ibp"]
        assert r["n_test"] == 20 and r["certified_but_attacked"] == 0
        assert [c["epoch"] for c in r["curve"]] == [1] and 0 <= r["curve"][0]["test_ibp_verified_err"] <= 1
        assert r["train_seconds"] > r["seconds_per_epoch"] > 0
    a = [r["clean_err"] for r in study["runs"] if r["row"] == "natural"]
    assert study["summary"]["natural"]["clean_err"]["mean"] == pytest.approx(sum(a) / 2)
    assert study["summary"]["natural"]["clean_err"]["sd"] == pytest.approx(abs(a[0] - a[1]) / math.sqrt(2))
    assert study["summary"]["advibp"]["clean_err"] == {"mean": study["runs"][0]["clean_err"], "sd": 0.0}
    table = (out / "study.md").read_text()
    assert "| advibp | 1 | " in table and "| natural | 2 | " in table and "| ibp |" not in table
    assert f"| natural | 2 | {100 * sum(a) / 2:.2f} ± " in table
    walls = {p: p.read_text() for p in (out / "study").glob("*/train_seconds")}
    again = run_script(args)  # finished runs are read back, not trained again
    assert again.returncode == 0 and "== run " not in again.stdout
    assert {p: p.read_text() for p in (out / "study").glob("*/train_seconds")} == walls
    assert json.loads((out / "study.json").read_text())["runs"] == study["runs"]
    bad = run_script(["bench.py", "study", "--rows", "advibp,lp", "--out", str(out)])
    assert bad.returncode == 2 and "unknown rows ['lp']" in bad.stderr


# ---------------------------------------------------------------------------------------------
# A clone without ../shared: those tests skip and say why; under CERTMIN_REQUIRE_SHARED=1 they fail
# ---------------------------------------------------------------------------------------------


def test_without_shared_the_data_tests_skip_and_ci_fails(tmp_path):
    select = ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_certmin.py", "test_scripts.py", "-k",
              "loader_reads or crown_is_tighter or help_explains"]
    env = {**os.environ, "CERTMIN_SHARED": str(tmp_path / "nowhere"), "CERTMIN_REQUIRE_SHARED": "0"}
    alone = subprocess.run([sys.executable, *select], capture_output=True, text=True, timeout=300, env=env,
                           cwd=Path(__file__).resolve().parent)
    assert alone.returncode == 0, alone.stdout[-2000:]
    assert "1 passed, 3 skipped" in alone.stdout and "Set CERTMIN_SHARED to a folder holding" in alone.stdout
    ci = subprocess.run([sys.executable, *select], capture_output=True, text=True, timeout=300,
                        env={**env, "CERTMIN_REQUIRE_SHARED": "1"}, cwd=Path(__file__).resolve().parent)
    assert ci.returncode == 1 and "3 failed, 1 passed" in ci.stdout, ci.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# The layer-wise latent stages of the authors' code
# ---------------------------------------------------------------------------------------------

def test_latent_attack_stays_inside_the_ibp_box_of_the_layers_input():
    torch.manual_seed(3)
    model = certmin.dm_small()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    k = train.affine_layers(model)[2]  # the first Linear: its input is the flattened conv features
    c, r = train.latent_box(model, k, x, 0.05)
    with torch.no_grad():  # the box holds every point the eps-box reaches there
        for _ in range(20):
            h = model[:k](torch.clamp(x + 0.05 * (2 * torch.rand_like(x) - 1), 0, 1))
            assert ((h - c).abs() <= r + 1e-6).all()
    z = certmin.fgsm_rs(model[k:], c, y, r, lo=-math.inf, hi=math.inf)
    assert ((z - c).abs() <= r * (1 + 1e-6)).all() and not torch.equal(z, c)
    cfg = config("--dataset", "mnist", "--eps", "0.3", "--model", "dm-small", "--latent-stages", "2")
    s = train.schedule(cfg, 250 + 260)
    assert (s["phase"], s["stage"], s["c_t"], s["final"]) == ("latent", 3 - 1, 0.0, True)
    assert s["eps_adv"] == s["eps_ver"] == cfg["eps_train"] and math.isclose(s["lr"], 5e-4 / 4)
    assert math.isclose(train.schedule(cfg, 250 + 250 + 210)["lr"], 5e-4 / 4 / 4 ** 3)
    assert train.total_epochs(cfg) == 750 and train.schedule(cfg, 249.9)["stage"] == 0


def test_latent_stages_freeze_earlier_layers_and_resume_exactly(tmp_path):
    opts = SMALL + ["--latent-stages", "2", "--latent-epochs", "1", "--allow-collapse"]
    assert in_process(opts + ["--out", str(tmp_path / "a")]) == 0
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4] and log[-1]["phases"] == ["latent"]
    b = tmp_path / "b"
    saved = []
    for stop in ("2", "3"):
        assert in_process(opts + ["--out", str(b), "--stop-after", stop] + ["--resume"] * (stop != "2")) == 0
        saved.append(train.load_checkpoint(b / "last.pt"))
    assert in_process(opts + ["--out", str(b), "--resume"]) == 0
    end, a = train.load_checkpoint(b / "last.pt"), train.load_checkpoint(tmp_path / "a" / "last.pt")
    for k, v in a["model"].items():  # resumed across both stage boundaries: the same weights
        assert torch.equal(v, end["model"][k]), k
    after_schedule, after_stage1 = (ck["model"] for ck in saved)
    for name in ("0.weight", "0.bias"):  # frozen from stage 1 on
        assert torch.equal(after_schedule[name], end["model"][name]), name
    for name in ("2.weight", "2.bias"):  # trained in stage 1, frozen in stage 2
        assert not torch.equal(after_schedule[name], after_stage1[name]) and torch.equal(after_stage1[name], end["model"][name])
    assert not torch.equal(after_stage1["7.weight"], end["model"]["7.weight"])
    with pytest.raises(SystemExit):
        train.parse_args(SMALL + ["--latent-stages", "4"])  # dm-small has 4 affine layers: at most 3 stages


def test_a_run_takes_latent_stages_on_resume_until_it_has_begun_them(tmp_path):
    out = tmp_path / "r"
    assert in_process(SMALL + ["--out", str(out)]) == 0
    extend = ["--out", str(out), "--resume", "--latent-stages", "1", "--latent-epochs", "1", "--allow-collapse"]
    assert in_process(SMALL + extend) == 0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2, 3] and log[-1]["phases"] == ["latent"]
    assert train.load_checkpoint(out / "last.pt")["config"]["latent_stages"] == 1
    assert in_process(SMALL + ["--out", str(out), "--resume", "--latent-stages", "2"]) == 2  # begun: fixed now


def test_prepared_released_pipeline_gpu_calls_dry_run(tmp_path):
    """results/released_pipeline/gpu_calls.sh with TINY=1 on the CPU: each call trains, verifies and
    leaves its logs and JSON (at most 8 files); call 3 extends call 1's run by a latent stage until
    its time is up (interrupted, it saves, and what it saved is verified)."""
    need_shared()
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TINY": "1", "DATA": str(SHARED / "data"), "RUNS": str(tmp_path / "runs")}
    for call in ("1", "3"):
        out = tmp_path / f"out{call}"
        done = subprocess.run(["bash", str(here / "results" / "released_pipeline" / "gpu_calls.sh"), call],
                              cwd=here, env={**env, "OUT": str(out)}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        assert "[train: exit " in done.stdout and "[verify: exit 0 " in done.stdout, done.stdout[-3000:]
        files = sorted(p.name for p in out.iterdir())
        assert files == ["train.log", "train_log.jsonl", "verify.json", "verify.log"], files
        report = json.loads((out / "verify.json").read_text())
        assert report["config"]["pipeline"] == "released" and report["rows"][0]["n"] == 200
    phases = {p for line in (out / "train_log.jsonl").read_text().splitlines() for p in json.loads(line)["phases"]}
    assert "latent" in phases and report["config"]["latent_stages"] == 1


def test_prepared_fast_recipe_gpu_calls_dry_run(tmp_path):
    """results/fast_recipe/gpu_calls.sh with TINY=1 on the CPU: CIFAR's parts pack and unpack byte for byte
    (checked against their md5), call 1 trains MNIST with the recipe and call 3 CIFAR, each verified, each
    leaving its logs and JSON (at most 8 files)."""
    need_shared()
    here = Path(__file__).resolve().parent
    src = SHARED / "data" / "cifar10" / "cifar-10-batches-py"
    data = tmp_path / "gpu" / "data"
    shutil.copytree(src, data / "cifar10" / "cifar-10-batches-py")  # the training files; the parts bring the rest
    (data / "cifar10" / "cifar-10-batches-py" / "batches.meta").unlink()
    shutil.copytree(SHARED / "data" / "mnist", tmp_path / "gpu" / "mnist")
    parts = here / "results" / "fast_recipe" / "cifar_parts.py"
    for k in (1, 3):  # a small file per part: the real ones are packed the same way, 41 MB a part
        pack = subprocess.run([sys.executable, str(parts), "pack", str(src), str(tmp_path / f"p{k}"), "--parts", "1",
                               "--files", "batches.meta"], capture_output=True, text=True, timeout=60)
        assert pack.returncode == 0, pack.stderr
        shutil.move(tmp_path / f"p{k}" / "c1", tmp_path / "gpu" / f"c{k}")
    env = {**os.environ, "TINY": "1", "GPU": str(tmp_path / "gpu"), "RUNS": str(tmp_path / "runs")}
    for call, dataset in (("1", "mnist"), ("3", "cifar")):
        out = tmp_path / f"out{call}"
        done = subprocess.run(["bash", str(here / "results" / "fast_recipe" / "gpu_calls.sh"), call],
                              cwd=here, env={**env, "OUT": str(out)}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        assert "batches.meta: 158 bytes, md5 checked" in done.stdout and "complete" in done.stdout, done.stdout[-3000:]
        assert "[train: exit 0 " in done.stdout and "[verify: exit 0 " in done.stdout, done.stdout[-3000:]
        assert sorted(p.name for p in out.iterdir()) == ["train.log", "train_log.jsonl", "verify.json", "verify.log"]
        report = json.loads((out / "verify.json").read_text())
        assert report["config"]["recipe"] == "fast" and report["config"]["dataset"] == dataset
        assert report["rows"][0]["n"] == 100 and report["certified_but_attacked"] == 0
        (out / f"call{call}.log").write_text(done.stdout)  # as the device call's tee keeps it
    table = run_script(["bench.py", "recipe-report", str(tmp_path / "out1"), str(tmp_path / "out3")])
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()[2:]
    assert len(rows) == 2 and rows[0].startswith("| mnist ibp dm-small-bn 2 epochs |") and "<= 6.6 |" in rows[0]
    assert rows[1].startswith("| cifar ibp") and "<= 66.57 |" in rows[1] and rows[1].endswith("no (on 100 images only) |")
