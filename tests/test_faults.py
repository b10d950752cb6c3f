"""Faults during a run, through the command line: kills, signals, crashes in the middle of a write,
damaged checkpoints, NaN losses and out-of-memory errors. Every interrupted run, started again with
the same command, must end exactly where an uninterrupted run ends (CPU, deterministic settings).

Faults a tiny run cannot meet by itself are injected with CASS_INJECT_FAULT=KIND@EPOCH.STEP, the
script started through tests/run_with_hooks.py: the process then sends itself the signal, gets a NaN
batch or an out-of-memory error at that step, or is killed in the middle of writing its checkpoint. Bad input
(data, CSVs, weight files, output folders) is in test_bad_input.py."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script, start_script
from runtime.runs import read_csv_log

pytestmark = pytest.mark.slow  # subprocess runs of the scripts: minutes in all

MONITOR = ["--monitor-bank", "32", "--monitor-val", "16"]  # (the default 512 + 256 images would cost
# several times the training of these 64-image runs; the monitors are tested in test_monitors.py)
TINY = {
    "pretrain_cass.py": (["--data", "synthetic", "--cnn", "test_resnet", "--vit", "test_vit",
                          "--img-size", "32", "--init", "random", "--workers", "0", "--bs", "16",
                          "--epochs", "3", "--limit-train", "64", *MONITOR], ["cnn.safetensors", "vit.safetensors"]),
    "pretrain_dino.py": (["--data", "synthetic", "--arch", "test_resnet", "--img-size", "32", "--local-size", "16",
                          "--local-crops", "2", "--out-dim", "1024", "--hidden-dim", "256", "--bottleneck-dim",
                          "64", "--init", "random", "--workers", "0", "--bs", "16", "--epochs", "3",
                          "--limit-train", "64", *MONITOR], ["backbone.safetensors"]),
    "finetune.py": (["--data", "synthetic", "--arch", "test_resnet", "--img-size", "32", "--init", "random",
                     "--workers", "0", "--bs", "32", "--epochs", "3", "--patience", "0", "--label-frac", "0.05"],
                    ["best.safetensors", "metrics.json"]),
}
SCRIPTS = list(TINY)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Each script's uninterrupted run, made once and shared: straight(script) is its output folder."""
    base = tmp_path_factory.mktemp("straight")
    done = {}

    def get(script):
        if script not in done:
            run_script(script, *TINY[script][0], "--out", script.removesuffix(".py"), cwd=base)
            done[script] = base / script.removesuffix(".py")
        return done[script]
    return get


def run(script, out, cwd, fault=None, extra=(), stop_after_epoch=None):
    """The tiny run of `script`; with a fault (CASS_INJECT_FAULT) or stop_after_epoch, started through
    tests/run_with_hooks.py, which installs those hooks."""
    env = {**os.environ, **({"CASS_INJECT_FAULT": fault} if fault else {})}
    env.pop("CASS_DEBUG", None)
    hooks = [] if fault or stop_after_epoch else None
    if stop_after_epoch:
        hooks += ["--stop-after-epoch", str(stop_after_epoch)]
    return run_script(script, *TINY[script][0], *extra, "--out", out, cwd=cwd, env=env, hooks=hooks, check=False)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith(("error:", "stopped:"))]


def assert_same_end(script, a, b):
    """The two run folders end with the same weights (bit for bit) and metrics, and the same
    per-epoch losses in log.csv."""
    for f in TINY[script][1]:
        if f.endswith(".safetensors"):
            x, y = load_file(a / f), load_file(b / f)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
        else:
            x, y = json.loads((a / f).read_text()), json.loads((b / f).read_text())
            assert x["f1_macro"] == y["f1_macro"] and x["best_epoch"] == y["best_epoch"]
    key = "train_loss" if script == "finetune.py" else "loss"
    la, lb = read_csv_log(a / "log.csv"), read_csv_log(b / "log.csv")
    assert [r["epoch"] for r in lb] == ["0", "1", "2"]  # an interrupted epoch is logged once
    assert [r[key] for r in la] == [r[key] for r in lb]


def checkpoint(out, name="checkpoint.pt"):
    return torch.load(out / name, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- kills and signals

def kill_after_first_epoch(script, args, out, cwd, sig=signal.SIGKILL, group=False):
    """Start the run and send it `sig` once its first epoch is logged (somewhere inside the next epoch).
    group=True: to its whole process group, as a terminal's Ctrl-C reaches the loader workers too."""
    proc = start_script(script, *args, "--out", out, cwd=cwd, new_session=group)
    log = cwd / out / "log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (log.exists() and len(log.read_text().strip().splitlines()) >= 2  # header + epoch 0
                and (cwd / out / "checkpoint.pt").exists()):  # and its checkpoint, written just after
            time.sleep(0.3)
            break
        time.sleep(0.05)
    if proc.poll() is None:
        (os.killpg if group else os.kill)(proc.pid, sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(tmp_path, script, straight):
    args, files = TINY[script]
    rc, _ = kill_after_first_epoch(script, args, "killed", tmp_path)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed; the test needs a longer run"
    assert not (tmp_path / "killed" / files[-1]).exists()
    killed = tmp_path / "killed"  # (checkpoint.pt is missing if the kill came while the next one was written)
    latest = checkpoint(killed) if (killed / "checkpoint.pt").exists() else checkpoint(killed, "checkpoint.prev.pt")
    assert latest.get("partial") is None  # a kill saves nothing: the last complete epoch's checkpoint stays
    run_script(script, *args, "--out", "killed", cwd=tmp_path)
    assert_same_end(script, straight(script), tmp_path / "killed")


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigterm_saves_the_middle_of_the_epoch_and_the_rerun_continues_it(tmp_path, script, straight):
    proc = run(script, "stopped", tmp_path, fault="sigterm@2.1")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert error_lines(proc) == ["stopped: SIGTERM after epoch 2 step 1: checkpoint saved in stopped; "
                                 "rerun the same command to continue from there"]
    assert "Traceback" not in proc.stderr
    ck = checkpoint(tmp_path / "stopped")
    assert ck["epoch"] == 0 and ck["partial"]["step"] == 1  # epoch 1 done, one step of epoch 2
    assert not (tmp_path / "stopped" / TINY[script][1][-1]).exists()
    again = run(script, "stopped", tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming stopped in epoch 2 after its step 1" in again.stdout
    assert_same_end(script, straight(script), tmp_path / "stopped")


def test_ctrl_c_to_the_process_group_with_loader_workers(tmp_path, straight):
    """A real SIGINT from outside, to the main process and its data loader worker at once (a
    terminal's Ctrl-C): the workers leave it to the main process, which saves and exits with 130;
    the rerun (with another number of workers, which changes nothing) ends bit-identical."""
    script = "pretrain_cass.py"
    args = [a if a != "0" or i == 0 or TINY[script][0][i - 1] != "--workers" else "1"
            for i, a in enumerate(TINY[script][0])]
    assert args[args.index("--workers") + 1] == "1"
    rc, err = kill_after_first_epoch(script, args, "ctrl_c", tmp_path, sig=signal.SIGINT, group=True)
    assert rc == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err
    m = re.search(r"stopped: SIGINT after epoch (\d+)(?: step (\d+))?: checkpoint saved in ctrl_c", err)
    assert m, err[-2000:]
    ck = checkpoint(tmp_path / "ctrl_c")  # what the message says was saved
    if m.group(2):
        assert ck["epoch"] == int(m.group(1)) - 2 and ck["partial"]["step"] == int(m.group(2))
    else:
        assert ck["epoch"] == int(m.group(1)) - 1 and "partial" not in ck
    run_script(script, *TINY[script][0], "--out", "ctrl_c", cwd=tmp_path)
    assert_same_end(script, straight(script), tmp_path / "ctrl_c")


def test_a_second_signal_quits_at_once_keeping_the_last_checkpoint(tmp_path):
    """Ctrl-C twice within one step: the second one does not wait for the checkpoint."""
    proc = run("pretrain_cass.py", "twice", tmp_path, fault="sigint@2.1,sigint@2.1")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert error_lines(proc) == ["error: interrupted (Ctrl-C) before a checkpoint could be saved; outputs written "
                                 "so far are complete, rerun the same command to resume"]
    ck = checkpoint(tmp_path / "twice")
    assert ck["epoch"] == 0 and "partial" not in ck  # the end of epoch 1, not a half-saved epoch 2


HANDLERS_AFTER_MAIN = """
import importlib, json, signal, sys
root, tiny = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [root, root + "/tests"]
import run_with_hooks
faults = []  # set before each run: the hooks read the list at every step
run_with_hooks.install_step_faults(faults)
mine = lambda signum, frame: None
signal.signal(signal.SIGTERM, mine)
signal.signal(signal.SIGINT, signal.default_int_handler)  # (started in the background, SIGINT would be ignored)
outcomes = {}
for script, argv in tiny.items():
    main = importlib.import_module(script.removesuffix(".py")).main
    for case, fault in (("finished", []), ("SIGTERM", [("sigterm", 0, 1)]), ("NaN loss", [("nan", 0, 1)])):
        faults[:] = fault
        try:
            main(argv + ["--epochs", "1", "--out", f"{script}-{case}"])
            outcome = "returned"
        except BaseException as e:
            outcome = type(e).__name__
        outcomes[f"{script}, {case}"] = [outcome, signal.getsignal(signal.SIGTERM) is mine,
                                         signal.getsignal(signal.SIGINT) is signal.default_int_handler]
print(json.dumps(outcomes))
"""


def test_main_called_from_python_puts_back_the_signal_handlers_it_found(tmp_path):
    """Each script's main() run from Python, one after another in one process (a notebook, a sweep):
    whether a run ends, stops on a signal or on a NaN loss, SIGTERM and Ctrl-C are handled afterwards
    as before it, not by the finished run's StopOnSignal, which would only note them."""
    from conftest import ROOT
    env = {k: v for k, v in os.environ.items() if k != "CASS_DEBUG"}
    tiny = json.dumps({script: argv for script, (argv, _) in TINY.items()})
    proc = subprocess.run([sys.executable, "-c", HANDLERS_AFTER_MAIN, str(ROOT), tiny], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes == {f"{script}, {case}": [outcome, True, True] for script in SCRIPTS
                        for case, outcome in (("finished", "returned"), ("SIGTERM", "Interrupted"),
                                              ("NaN loss", "UserError"))}


# ---------------------------------------------------------------- crashes while writing, damaged checkpoints

def test_a_crash_while_writing_the_checkpoint_keeps_the_previous_one(tmp_path, straight):
    script = "pretrain_cass.py"
    proc = run(script, "crash", tmp_path, fault="kill-in-save@2")
    assert proc.returncode == -signal.SIGKILL
    out = tmp_path / "crash"
    assert not (out / "checkpoint.pt").exists()  # never a truncated file under the real name
    assert checkpoint(out, "checkpoint.prev.pt")["epoch"] == 0
    assert list(out.glob(".checkpoint.pt.*.tmp"))  # the half-written temporary file
    again = run(script, "crash", tmp_path)
    assert again.returncode == 0 and "resuming crash after epoch 1" in again.stdout
    assert not list(out.glob(".*.tmp"))  # cleaned up
    assert_same_end(script, straight(script), out)


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, straight):
    script = "pretrain_cass.py"
    out = tmp_path / "cut"
    assert run(script, "cut", tmp_path, stop_after_epoch=2).returncode == 0
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 3])  # a disk fault, not our write
    again = run(script, "cut", tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"warning: cannot read {out.name}/checkpoint.pt" in again.stderr
    assert "resuming cut after epoch 1" in again.stdout
    assert_same_end(script, straight(script), out)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path):
    """A checkpoint that is a pickle of an arbitrary object is never unpickled (weights_only), and
    with nothing readable the run stops with one line rather than overwrite the folder's results."""
    script = "finetune.py"
    out = tmp_path / "evil"
    assert run(script, "evil", tmp_path, stop_after_epoch=1).returncode == 0
    marker = tmp_path / "pwned"
    with open(out / "checkpoint.pt", "wb") as f:
        pickle.dump({"epoch": _Evil(str(marker))}, f)
    proc = run(script, "evil", tmp_path)
    assert proc.returncode == 2
    assert not marker.exists()
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error: no readable checkpoint in evil (evil/checkpoint.pt:")
    assert "--force" in lines[0] and "Traceback" not in proc.stderr
    assert (out / "log.csv").exists()  # the folder's results are untouched


# ---------------------------------------------------------------- numerical faults

@pytest.mark.parametrize("script", SCRIPTS)
def test_a_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, script):
    proc = run(script, "nan", tmp_path, fault="nan@2.2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: loss is not finite (nan or inf) at epoch 2 step 2; stopped, the last good "
                               "checkpoint in nan is kept")
    ck = checkpoint(tmp_path / "nan")
    assert ck["epoch"] == 0 and "partial" not in ck
    weights = ck["model" if script == "finetune.py" else "student" if script == "pretrain_dino.py" else "cnn"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert not (tmp_path / "nan" / TINY[script][1][0]).exists()


def test_a_nan_loss_never_reaches_a_signal_checkpoint(tmp_path):
    """NaN weights at step 2, SIGTERM at step 3 (before the every-20-steps check saw the NaN): the
    run reports the NaN and does not save the poisoned weights as its latest checkpoint."""
    proc = run("pretrain_cass.py", "both", tmp_path, fault="nan@2.2,sigterm@2.3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc)[0].startswith("error: loss is not finite (nan or inf) at epoch 2 step 2;")
    ck = checkpoint(tmp_path / "both")
    assert ck["epoch"] == 0 and "partial" not in ck


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_of_memory_suggests_a_smaller_batch(tmp_path, script):
    proc = run(script, "oom", tmp_path, fault="oom@2.1")
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = error_lines(proc)
    bs = TINY[script][0][TINY[script][0].index("--bs") + 1]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"error: out of GPU memory at --bs {bs}: try a smaller --bs or --img-size")
    assert checkpoint(tmp_path / "oom")["epoch"] == 0  # the last complete epoch is kept


@pytest.mark.parametrize("world,drop", [(1, None), (2, None), (3, None), (2, 8)])
def test_a_resumed_epoch_yields_exactly_the_items_it_had_left(world, drop):
    """EpochSampler with start=k*b: each process's remaining items are the tail of its full order."""
    from pipeline.loading import EpochSampler
    for rank in range(world):
        full, part = EpochSampler(37, True, drop_multiple=drop), EpochSampler(37, True, drop_multiple=drop)
        for s in (full, part):
            s.rank, s.world = rank, world
        full.set_epoch_seed(5)
        part.set_epoch_seed(5, start=2 * 4)  # two batches of 4 per process done
        items = list(full)
        assert list(part) == items[8:] and len(part) == len(items) - 8 == len(list(part))
