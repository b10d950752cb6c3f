"""Faults: a run killed with SIGKILL in the middle of training resumes, when the same command is run
again, from its last complete epoch and ends exactly where an uninterrupted run ends (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from common import read_csv_log
from conftest import ROOT, run_script

TINY = {
    "pretrain_cass.py": (["--data", "synthetic", "--cnn", "resnet18", "--vit", "vit_tiny_patch16_224",
                          "--img-size", "32", "--init", "random", "--workers", "0", "--bs", "16",
                          "--epochs", "3", "--limit-train", "64"], ["cnn.safetensors", "vit.safetensors"]),
    "pretrain_dino.py": (["--data", "synthetic", "--arch", "resnet18", "--img-size", "32", "--local-size", "16",
                          "--local-crops", "2", "--out-dim", "1024", "--hidden-dim", "256", "--bottleneck-dim",
                          "64", "--init", "random", "--workers", "0", "--bs", "16", "--epochs", "3",
                          "--limit-train", "64"], ["backbone.safetensors"]),
    "finetune.py": (["--data", "synthetic", "--arch", "resnet18", "--img-size", "32", "--init", "random",
                     "--workers", "0", "--bs", "32", "--epochs", "3", "--patience", "0", "--label-frac", "0.05"],
                    ["best.safetensors", "metrics.json"]),
}


def kill_after_first_epoch(script, args, out, cwd):
    """Start the run and SIGKILL it once its first epoch is logged (or whenever it gets there)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args, "--out", out], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = cwd / out / "log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().strip().splitlines()) >= 2:  # header + epoch 0
            time.sleep(0.3)  # somewhere inside the next epoch
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.mark.parametrize("script", list(TINY))
def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(tmp_path, script):
    args, files = TINY[script]
    run_script(script, *args, "--out", "straight", cwd=tmp_path)
    rc = kill_after_first_epoch(script, args, "killed", tmp_path)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed; the test needs a longer run"
    assert not (tmp_path / "killed" / files[-1]).exists()
    run_script(script, *args, "--out", "killed", cwd=tmp_path)
    epochs = [r["epoch"] for r in read_csv_log(tmp_path / "killed" / "log.csv")]
    assert epochs == ["0", "1", "2"]  # the killed epoch is logged once, after the rerun
    for f in files:
        a, b = tmp_path / "straight" / f, tmp_path / "killed" / f
        if f.endswith(".safetensors"):
            x, y = load_file(a), load_file(b)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
        else:
            x, y = json.loads(a.read_text()), json.loads(b.read_text())
            assert x["f1_macro"] == y["f1_macro"] and x["best_epoch"] == y["best_epoch"]
