import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import run_script
from runtime.runs import read_csv_log

SMALL = ["--data", "synthetic", "--cnn", "test_resnet", "--vit", "test_vit", "--img-size", "32",
         "--init", "random", "--workers", "0", "--bs", "16", "--monitor-bank", "32", "--monitor-val", "16"]


def cass(tmp_path, out, *extra, check=True, stop_after_epoch=None):
    return run_script("pretrain_cass.py", *SMALL, "--out", out, *extra, cwd=tmp_path, check=check,
                      stop_after_epoch=stop_after_epoch)


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cass")
    proc = cass(tmp, "run", "--epochs", "2", "--limit-train", "48")
    return tmp / "run", proc


@pytest.mark.slow
def test_run_writes_its_files(two_epoch_run):
    out, proc = two_epoch_run
    for name in ("config.json", "log.csv", "cnn.safetensors", "vit.safetensors", "cnn_last.safetensors",
                 "vit_last.safetensors", "checkpoint.pt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["cnn"] == "test_resnet" and config["epochs"] == 2 and config["lr"] == 1e-3
    rows = read_csv_log(out / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for key in ("loss", "lr_cnn", "lr_vit", "seconds", "img_per_s", "cnn_std", "vit_std", "guard_fired"):
        assert key in rows[0]
    assert int(rows[0]["guard_fired"]) == 0
    assert "done: 2 epochs" in proc.stdout and "cnn.safetensors" in proc.stdout


@pytest.mark.parametrize("arm,name,kw", [("cnn", "test_resnet", {}), ("vit", "test_vit", {"img_size": 32})])
def test_weights_reload_bit_identically_into_timm(two_epoch_run, arm, name, kw):
    out, _ = two_epoch_run
    for file in (f"{arm}.safetensors", f"{arm}_last.safetensors"):
        saved = load_file(out / file)
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / file)), **kw)
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # SWA averaged the last epoch, but the SWA copy of the CNN has recomputed BatchNorm statistics
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    last = load_file(out / f"{arm}_last.safetensors")
    assert all(torch.equal(ckpt[arm][k], last[k]) for k in last)


def test_schedule_is_a_per_step_cosine_of_16_iterations(two_epoch_run):
    out, _ = two_epoch_run
    rows = read_csv_log(out / "log.csv")
    # 48 images / 16 = 3 steps per epoch; after 3 and 6 steps of CosineAnnealingLR(T_max=16, eta_min=1e-6)
    import math
    for row, steps in zip(rows, (3, 6)):
        want = 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * steps / 16)) / 2
        assert float(row["lr_cnn"]) == pytest.approx(want, rel=1e-4)
        assert float(row["lr_vit"]) == pytest.approx(want, rel=1e-4)


@pytest.mark.slow
def test_loss_goes_down_on_a_fixed_small_set(tmp_path):
    cass(tmp_path, "run", "--epochs", "4", "--limit-train", "32", "--no-swa")
    losses = [float(r["loss"]) for r in read_csv_log(tmp_path / "run" / "log.csv")]
    assert losses[-1] < losses[0] * 0.8, losses


@pytest.mark.slow
def test_resumed_run_continues_the_same_curve(tmp_path):
    args = ["--epochs", "3", "--limit-train", "32"]
    cass(tmp_path, "straight", *args)
    cass(tmp_path, "resumed", *args, stop_after_epoch=1)
    assert not (tmp_path / "resumed" / "cnn.safetensors").exists()
    proc = cass(tmp_path, "resumed", *args)
    assert "resuming" in proc.stdout
    a = read_csv_log(tmp_path / "straight" / "log.csv")
    b = read_csv_log(tmp_path / "resumed" / "log.csv")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    for f in ("cnn.safetensors", "vit.safetensors", "cnn_last.safetensors"):
        x, y = load_file(tmp_path / "straight" / f), load_file(tmp_path / "resumed" / f)
        assert all(torch.equal(x[k], y[k]) for k in x), f


@pytest.mark.parametrize("extra,match", [
    (["--data", "imagenet"], "unknown data set"),
    (["--data", "folder", "--data-root", "/nonexistent/dir"], "no such folder"),
    (["--bs", "64", "--limit-train", "32"], "larger than the training set"),
    (["--extra-aug", "mixup"], "unknown augmentation"),
    (["--cnn", "resnet9000"], "unknown timm model"),
])
@pytest.mark.slow
def test_bad_input_gives_one_line_and_exit_2(tmp_path, extra, match):
    proc = cass(tmp_path, "bad", "--epochs", "1", *extra, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_output_folder_of_another_run_is_refused(tmp_path):
    cass(tmp_path, "run", "--epochs", "1", "--limit-train", "16", stop_after_epoch=1)
    proc = cass(tmp_path, "run", "--epochs", "1", "--limit-train", "16", "--lr", "0.01", check=False)
    assert proc.returncode == 2 and "differs in: lr" in proc.stderr


@pytest.mark.slow
def test_each_arm_can_start_from_its_own_weights(tmp_path):
    """--vit-init PATH loads arm 2 from a file while arm 1 keeps --init random (Tables 15/17 have
    a random ResNet-200 beside an ImageNet ViT). With a zero learning rate the ViT (LayerNorm only,
    no running statistics) ends exactly as it started."""
    from models import save_weights
    start = timm.create_model("test_vit", img_size=32)
    torch.nn.init.normal_(start.head.weight)  # unlike any fresh initialisation
    save_weights(start, tmp_path / "vit_start.safetensors")
    proc = cass(tmp_path, "arms", "--epochs", "1", "--limit-train", "16", "--lr", "0", "--min-lr", "0", "--no-swa",
                "--vit-init", tmp_path / "vit_start.safetensors")
    assert "test_resnet (0.5M, from random)" in proc.stdout and "vit_start.safetensors)" in proc.stdout
    a, b = load_file(tmp_path / "vit_start.safetensors"), load_file(tmp_path / "arms" / "vit_last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = cass(tmp_path, "bad", "--epochs", "1", "--cnn-init", tmp_path / "vit_start.safetensors", check=False)
    assert bad.returncode == 2 and f"--cnn-init {tmp_path / 'vit_start.safetensors'} does not fit test_resnet" in bad.stderr
