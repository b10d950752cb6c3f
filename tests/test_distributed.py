"""torchrun: two CPU processes (gloo) train the same tiny CASS (and DINO) run as one process with
the same global batch, and end with the same weights.

Why they can match: --bs is the global batch, split evenly over the processes (each takes every
other image of the epoch's order, so their batches together are the single process's batch);
each image's augmentation is seeded by (epoch, row), not by the process or worker that loads it;
DDP averages the gradients of the two halves, which equals the gradient of the whole batch's mean
loss; BatchNorm is synchronised (cpu_sync_batchnorm.CpuSyncBatchNorm on gloo, nn.SyncBatchNorm on CUDA) so
its statistics are the whole batch's, and the SWA BatchNorm recomputation runs synchronised on
both processes. What differs is only the order of floating-point sums (per-process partial sums,
the all-reduce), hence allclose with a tight tolerance rather than equality.

The CNN arm is trained with SGD here (--cnn-opt sgd), and its weights, SWA average and recomputed
BatchNorm statistics must all match to 1e-6. The ViT arm always uses Adam, whose first steps move
every weight by about +-lr whatever the gradient's size (lr * m / (sqrt(v) + eps)): a weight whose
gradient is a cancellation at the level of float rounding may move either way in either run. So
for Adam weights all but 1e-4 of the elements must match to 1e-5 and the others by at most
2 lr per step. (With Adam on the CNN too, its many near-zero gradients make a few percent of the weights
differ that way, after which BatchNorm statistics drift apart: not a useful comparison.)"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import HOOKS, ROOT, run_script
from runtime.runs import read_csv_log

pytestmark = pytest.mark.slow  # subprocess runs of the scripts: minutes in all

ARGS = ["--data", "synthetic", "--cnn", "test_resnet", "--vit", "test_vit", "--img-size", "32",
        "--init", "random", "--workers", "0", "--bs", "16", "--epochs", "2", "--limit-train", "32",
        "--cnn-opt", "sgd", "--monitor-bank", "32", "--monitor-val", "16"]  # (a small monitor: a fraction of
# the default's cost, which would be several times the training's here)
LR, STEPS = 1e-3, 4


def torchrun(script, *args, cwd, nproc=2, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(cwd))  # (torchrun's own folders, removed with cwd)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        run_script("pretrain_cass.py", *ARGS, "--out", "single", cwd=tmp)
        proc = torchrun("pretrain_cass.py", *ARGS, "--out", "ddp", cwd=tmp)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return tmp, proc


def test_two_processes_end_with_the_weights_of_one(runs):
    tmp, proc = runs
    assert "x 2 processes" in proc.stdout
    for name in ("cnn_last", "vit_last", "cnn", "vit"):  # raw weights, and SWA (BatchNorm recomputed)
        a = load_file(tmp / "single" / f"{name}.safetensors")
        b = load_file(tmp / "ddp" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        n = off = 0
        for k in a:
            if k.endswith("num_batches_tracked"):
                assert torch.equal(a[k], b[k]), (name, k)
                continue
            d = (a[k] - b[k]).abs()
            if name.startswith("cnn"):  # SGD: everything matches
                assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (name, k, d.max().item())
            else:  # Adam: a few sign-flipped updates of near-zero gradients, each at most 2 lr per step
                assert d.max() <= 2 * LR * STEPS, (name, k, d.max().item())
                n, off = n + d.numel(), off + int((d > 1e-5 + 1e-4 * a[k].abs()).sum())
        assert name.startswith("cnn") or off <= 1e-4 * n, (name, off, n)


def test_the_logged_loss_is_the_whole_batch_loss(runs):
    tmp, _ = runs
    a = read_csv_log(tmp / "single" / "log.csv")
    b = read_csv_log(tmp / "ddp" / "log.csv")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-4)
        assert float(ra["cnn_std"]) == pytest.approx(float(rb["cnn_std"]), rel=1e-3)


def test_only_rank_0_writes(runs):
    tmp, _ = runs
    names = sorted(p.name for p in (tmp / "ddp").iterdir())
    assert names == sorted(p.name for p in (tmp / "single").iterdir())
    assert not [n for n in names if n.endswith(".tmp")]


DINO = ["--data", "synthetic", "--arch", "test_resnet", "--img-size", "32", "--local-size", "16", "--local-crops", "2",
        "--out-dim", "256", "--hidden-dim", "64", "--bottleneck-dim", "32", "--init", "random", "--workers", "0",
        "--bs", "16", "--epochs", "2", "--limit-train", "40", "--optimizer", "sgd", "--lr", "0.5",
        "--warmup-epochs", "0", "--monitor-bank", "32", "--monitor-val", "16"]


def test_dino_two_processes_match_one(tmp_path):
    """DINO under torchrun: the same student and teacher (EMA) weights, BatchNorm statistics (student
    and teacher synchronised) and centre (all-reduced teacher means) as one process; 40 images at
    batch 16 give 2 full batches per epoch on both (the incomplete last batch is dropped either way)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        run_script("pretrain_dino.py", *DINO, "--out", "single", cwd=tmp_path)
        torchrun("pretrain_dino.py", *DINO, "--out", "ddp", cwd=tmp_path)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    for name in ("backbone", "student_backbone"):
        a = load_file(tmp_path / "single" / f"{name}.safetensors")
        b = load_file(tmp_path / "ddp" / f"{name}.safetensors")
        for k in a:
            assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-5), (name, k)
    ca = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)["dino_loss"]["center"]
    cb = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["dino_loss"]["center"]
    assert torch.allclose(ca, cb, atol=1e-6)
    la, lb = read_csv_log(tmp_path / "single" / "log.csv"), read_csv_log(tmp_path / "ddp" / "log.csv")
    assert [float(r["loss"]) for r in la] == pytest.approx([float(r["loss"]) for r in lb], rel=1e-5)


def test_sigterm_under_torchrun_saves_once_and_the_rerun_ends_like_the_uninterrupted_run(runs):
    """Both processes get SIGTERM in the first step of epoch 2 (as a scheduler signals every process
    of a job): they agree to stop after that step, rank 0 saves the middle of the epoch, each exits
    143; torchrun again continues from that step and ends with the uninterrupted DDP run's weights
    and per-epoch losses."""
    tmp, _ = runs
    proc = torchrun_stopped_at_epoch_2_step_1(tmp, ARGS, "stopped")
    assert proc.returncode != 0
    assert proc.stderr.count("stopped: SIGTERM after epoch 2 step 1: checkpoint saved in stopped") == 2
    ck = torch.load(tmp / "stopped" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 0 and ck["partial"]["step"] == 1
    torchrun("pretrain_cass.py", *ARGS, "--out", "stopped", cwd=tmp)
    assert_same_cass_run(tmp / "ddp", tmp / "stopped")


def torchrun_stopped_at_epoch_2_step_1(tmp, args, out):
    """CASS under torchrun (2 processes) with a SIGTERM noted at epoch 2 step 1 (the hooks: the fault)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CASS_INJECT_FAULT="sigterm@2.1", TMPDIR=str(tmp))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HOOKS), str(ROOT / "pretrain_cass.py"), *args, "--out", out]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600, env=env)


def assert_same_cass_run(a_dir, b_dir):
    """Both CASS runs end with the same weights, bit for bit, and the same per-epoch losses."""
    for name in ("cnn_last", "vit_last", "cnn", "vit"):
        a = load_file(a_dir / f"{name}.safetensors")
        b = load_file(b_dir / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["loss"] for r in read_csv_log(a_dir / "log.csv")] == [r["loss"] for r in read_csv_log(b_dir / "log.csv")]


def test_torchrun_resumes_a_stop_after_the_last_step_of_an_epoch(runs):
    """16 images at --bs 16: one step per epoch, so a SIGTERM before the first step of epoch 2 is
    noted after that epoch's last step, and the checkpoint is of the middle of epoch 2 with no step
    left. Every process must resume it with the same running sums (rank 0 with the saved ones,
    the others with zeros), and the rerun ends with the weights and losses of an uninterrupted run."""
    tmp, _ = runs
    one_step = [*ARGS, "--limit-train", "16"]
    torchrun("pretrain_cass.py", *one_step, "--out", "one_step", cwd=tmp)
    proc = torchrun_stopped_at_epoch_2_step_1(tmp, one_step, "stopped_at_end")
    assert proc.returncode != 0 and "stopped: SIGTERM after epoch 2 step 1" in proc.stderr
    ck = torch.load(tmp / "stopped_at_end" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 0 and ck["partial"]["step"] == 1  # the whole of epoch 2 done, not yet logged
    torchrun("pretrain_cass.py", *one_step, "--out", "stopped_at_end", cwd=tmp)
    assert_same_cass_run(tmp / "one_step", tmp / "stopped_at_end")
