"""Stopping study/run_all.py, through its command line, on a sweep of three short runs (tests/tiny_sweep.py):
SIGTERM to its main process or Ctrl-C to its process group reaches every worker once, each running
run saves a checkpoint, the main process exits with 128 + the signal and leaves no process behind,
and the same command then ends with the results of an uninterrupted sweep. A second signal or
--stop-timeout ends stubborn jobs at once; a killed main process leaves no orphans training on; a
worker that dies is reported with its run. And two processes that need the same split file and
decoded-image cache at once make each once.

Every process of a sweep is found by its session: the main process is started in a new one, which
its workers and their children inherit."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")]

RUNS = Path("synthetic")
CASS = RUNS / "cass" / "test_resnet+test_vit-bs16-ep8-random-seed0"  # (tests/tiny_sweep.py's runs)
SUPERVISED = RUNS / "finetune" / "supervised-random" / "test_resnet-frac0.05-seed0"
FROM_CASS = RUNS / "finetune" / "cass-test_resnet+test_vit-bs16-ep8-random-cnn" / "test_resnet-frac0.05-seed0"


class Sweep:
    """`python tests/tiny_sweep.py tiny` in folder `base`, its main process in a session of its own."""

    def __init__(self, base: Path, *flags, env=None):
        self.base, self.runs = base, base / "runs"
        self.out = base / f"sweep-{time.time_ns()}.out"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        with open(self.out, "w") as f:  # a file, not a pipe: a process left behind cannot hang the test
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "tiny_sweep.py"), "tiny", "--runs", str(self.runs),
                 "--results", str(base / "results"), "--jobs", "2", *flags],
                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.out.read_text()

    def wait(self, timeout=600) -> int:
        return self.proc.wait(timeout=timeout)

    def wait_until(self, condition, what, timeout=300):
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the sweep ended ({self.proc.returncode}) before {what}:\n{self.output()}"
            assert time.time() < deadline, f"no {what} after {timeout}s:\n{self.output()}"
            time.sleep(0.05)

    def training(self, run) -> bool:
        """The run has logged an epoch and saved its checkpoint: it is in its training loop."""
        log, ckpt = self.runs / run / "log.csv", self.runs / run / "checkpoint.pt"
        return log.exists() and len(log.read_text().strip().splitlines()) >= 2 and ckpt.exists()

    def processes(self) -> list:
        return session(self.pid)

    def assert_no_process_left(self, within=10):
        deadline = time.time() + within
        while self.processes() and time.time() < deadline:
            time.sleep(0.1)
        left = self.processes()
        assert not left, "left behind: " + "; ".join(cmdline(p) for p in left)

    def kill_left(self):
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def session(sid: int) -> list:
    """The live processes of session `sid` (zombies aside)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # state, ppid, pgrp, session
                pids.append(int(d))
    return pids


def cmdline(pid) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:150]
    except OSError:
        return f"{pid}: (gone)"


@pytest.fixture
def sweeps():
    """Sweep(...) of a test; whatever they leave behind is killed when the test ends."""
    started = []

    def start(*args, **kw):
        started.append(Sweep(*args, **kw))
        return started[-1]
    yield start
    for s in started:
        s.kill_left()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The results of the sweep run without interruption."""
    base = tmp_path_factory.mktemp("straight")
    s = Sweep(base)
    try:
        assert s.wait() == 0, s.output()
    finally:
        s.kill_left()
    return results(base)


def results(base: Path) -> dict:
    """What a finished sweep made: every weight file, the fine-tuning metrics, the table."""
    runs = base / "runs"
    out = {"table": (base / "results" / "tiny.csv").read_text()}
    for f in sorted(runs.rglob("*.safetensors")):
        out[str(f.relative_to(runs))] = load_file(f)
    for f in sorted(runs.rglob("metrics.json")):
        m = json.loads(f.read_text())
        out[str(f.relative_to(runs))] = (m["f1_macro"], m["best_epoch"])
    return out


def assert_same_results(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
        else:
            assert a[k] == b[k], k


def assert_stopped_with_a_checkpoint(run: Path):
    """The run's log says it stopped on SIGTERM after saving a checkpoint, and the checkpoint is that one."""
    text = (run / "run_all.log").read_text()
    m = re.search(rf"stopped: SIGTERM after epoch (\d+)(?: step (\d+))?: checkpoint saved in {re.escape(str(run))};",
                  text)
    assert m, text[-2000:]
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    if m.group(2):
        assert ck["epoch"] == int(m.group(1)) - 2 and ck["partial"]["step"] == int(m.group(2))
    else:
        assert ck["epoch"] == int(m.group(1)) - 1 and "partial" not in ck


def stop_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("stopped by ")]
    assert len(lines) == 1, output
    return lines[0]


# ---------------------------------------------------------------- a signal to the main process

@pytest.mark.parametrize("how", ["sigterm-to-main", "ctrl-c-to-group"])
def test_a_signal_checkpoints_every_running_job_and_the_same_command_resumes(tmp_path, sweeps, straight, how):
    """SIGTERM to the main process (`kill`, `timeout`, a scheduler), or SIGINT to its whole process
    group (a terminal's Ctrl-C, which the workers must not get a second time from the main process)."""
    s = sweeps(tmp_path)
    s.wait_until(lambda: s.training(CASS) and s.training(SUPERVISED), "two runs training at once")
    sig = signal.SIGTERM if how == "sigterm-to-main" else signal.SIGINT
    (os.kill if how == "sigterm-to-main" else os.killpg)(s.pid, sig)
    assert s.wait(timeout=120) == 128 + sig, s.output()
    s.assert_no_process_left()
    runs = [s.runs / CASS, s.runs / SUPERVISED]
    assert not (runs[0] / "cnn.safetensors").exists() and not (runs[1] / "metrics.json").exists(), \
        "a run finished before the signal: the test needs longer runs"
    for run in runs:
        assert_stopped_with_a_checkpoint(run)
    assert stop_line(s.output()) == (f"stopped by {sig.name}: checkpoint saved by {runs[0]}, {runs[1]}; "
                                     "run the same command again to resume")
    if how == "sigterm-to-main":  # (the other way ends the same: it left the same checkpoints)
        again = sweeps(tmp_path)
        assert again.wait() == 0, again.output()
        assert "resuming" in (s.runs / CASS / "run_all.log").read_text()
        assert_same_results(results(tmp_path), straight)


@pytest.mark.parametrize("how", ["stop-timeout", "second-signal"])
def test_stubborn_jobs_are_killed_at_the_bound_or_a_second_signal(tmp_path, sweeps, how):
    """Jobs that ignore SIGTERM: the main process kills them once --stop-timeout has passed, or at
    once on a second signal, and exits with 128 + SIGTERM."""
    s = sweeps(tmp_path, *(["--stop-timeout", "3"] if how == "stop-timeout" else []), env={"TINY_STUBBORN": "2"})
    logs = [s.runs / f"stubborn{i}" / "run_all.log" for i in range(2)]
    s.wait_until(lambda: all(f.exists() and "ignoring SIGTERM" in f.read_text() for f in logs), "the stubborn jobs")
    t0 = time.time()
    os.kill(s.pid, signal.SIGTERM)
    if how == "second-signal":
        time.sleep(1)
        os.kill(s.pid, signal.SIGTERM)
    assert s.wait(timeout=60) == 128 + signal.SIGTERM, s.output()
    took = time.time() - t0
    assert (3 <= took < 15) if how == "stop-timeout" else took < 10, took
    s.assert_no_process_left()
    assert stop_line(s.output()) == (
        f"stopped by SIGTERM: killed without a new checkpoint (resumes from its last saved epoch): "
        f"{s.runs / 'stubborn0'}, {s.runs / 'stubborn1'}; run the same command again to resume")


# ---------------------------------------------------------------- the main process killed, a worker killed

def test_workers_of_a_killed_main_process_stop_at_their_next_step_with_a_checkpoint(tmp_path, sweeps, straight):
    s = sweeps(tmp_path)
    s.wait_until(lambda: s.training(CASS) and s.training(SUPERVISED), "two runs training at once")
    os.kill(s.pid, signal.SIGKILL)
    s.wait()
    s.assert_no_process_left(within=15)
    runs = [s.runs / CASS, s.runs / SUPERVISED]
    assert not (runs[0] / "cnn.safetensors").exists() and not (runs[1] / "metrics.json").exists(), \
        "a run finished before the kill: the test needs longer runs"
    for run in runs:
        assert_stopped_with_a_checkpoint(run)
    again = sweeps(tmp_path)
    assert again.wait() == 0, again.output()
    assert_same_results(results(tmp_path), straight)


def worker_running(s: Sweep, run: Path) -> int:
    """The process of the sweep that has the run's run_all.log open: the worker running it."""
    log = str(s.runs / run / "run_all.log")
    for pid in s.processes():
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == log for fd in os.listdir(f"/proc/{pid}/fd")):
                return pid
        except OSError:
            continue
    raise AssertionError(f"no process has {log} open")


@pytest.mark.parametrize("keep_going", [True, False])
def test_a_worker_that_dies_is_reported_with_its_run(tmp_path, sweeps, straight, keep_going):
    """SIGKILL to the worker of the supervised run (as the kernel's out-of-memory killer would): that run
    fails, named with how its worker died; the CASS run beside it goes on. With --keep-going the
    fine-tuning of the CASS weights runs too; without, the sweep stops after the running run. Then
    the same command finishes the sweep with the uninterrupted sweep's results."""
    s = sweeps(tmp_path, *(["--keep-going"] if keep_going else []))
    s.wait_until(lambda: s.training(CASS) and s.training(SUPERVISED), "two runs training at once")
    os.kill(worker_running(s, SUPERVISED), signal.SIGKILL)
    assert s.wait() == 1, s.output()
    s.assert_no_process_left()
    out = s.output()
    assert re.search(rf"^  FAILED finetune {re.escape(str(s.runs / SUPERVISED))} \(\d+s\): the worker process "
                     r"running it died: killed by SIGKILL \(out of memory\?\); last lines of ", out, re.M), out
    assert "run_all: the worker process running this job died: killed by SIGKILL" in \
        (s.runs / SUPERVISED / "run_all.log").read_text()
    assert f"done cass {s.runs / CASS}" in out and (s.runs / CASS / "cnn.safetensors").exists()
    assert (s.runs / FROM_CASS / "metrics.json").exists() == keep_going
    assert "1 run(s) failed" in out and "Traceback" not in out
    if keep_going:
        again = sweeps(tmp_path)
        assert again.wait() == 0, again.output()
        assert_same_results(results(tmp_path), straight)


# ---------------------------------------------------------------- shared files made once

RACER = r"""
import hashlib, json, sys, time
from pathlib import Path
from pipeline import copies as CP
import datasets as D
from pipeline import decoded_cache as DC
from pipeline import synthetic as S

root, split_file, cache, log, me = sys.argv[1:]

def counted(make):
    def slow_make(*args, **kw):
        with open(log, "a") as f:
            f.write(make.__name__ + "\n")
        time.sleep(1)  # a slow build: the other process arrives while it runs
        return make(*args, **kw)
    return slow_make

D.make_split, DC._build_cache, S._generate = counted(D.make_split), counted(DC._build_cache), counted(S._generate)
CP.find_copies = counted(CP.find_copies)
table = D.load_table("folder", root)
Path(log + f".ready{me}").touch()
while not Path(log + ".ready0").exists() or not Path(log + ".ready1").exists():
    time.sleep(0.01)
split = D.get_split(table, split_file)
cached = DC.cached_table(table, 16, cache, progress=False)
pixels = hashlib.sha1(b"".join(cached.array[r].tobytes() for r in range(len(table)))).hexdigest()
generated = S.ensure_synthetic(Path(cache), False, n_images=12, size=32, progress=False)
print(json.dumps({"split": {k: v.tolist() for k, v in split.items()}, "pixels": pixels,
                  "synthetic": hashlib.sha1((generated / "images.npy").read_bytes()).hexdigest()}))
"""


def test_two_processes_needing_the_same_split_cache_and_synthetic_data_make_each_once(tmp_path):
    """As two runs of run_all --jobs 2 (or two scripts started by hand) starting at once on a new data
    set: one process finds the copies and makes the split file, the decoded-image cache and the synthetic
    data, the other waits and reads them, complete."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(40):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / f"c{i % 2}" / f"{i}.png")
    split_file, log = tmp_path / "split.json", tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "data"), str(split_file),
                               str(tmp_path / "cache"), str(log), str(me)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for me in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert sorted(log.read_text().split()) == ["_build_cache", "_generate", "find_copies", "make_split"]  # each once
    a, b = (json.loads(out) for out, _ in outs)
    assert a == b
    import datasets as D
    from pipeline import decoded_cache as DC
    table = D.load_table("folder", tmp_path / "data")
    assert a["split"] == {k: v.tolist() for k, v in D.get_split(table, split_file).items()}
    assert sorted(sum(a["split"].values(), [])) == list(range(40))
    assert a["pixels"] == hashlib.sha1(b"".join(DC.decode_resized(p, 16).tobytes() for p in table.paths)).hexdigest()
    from pipeline import synthetic as S
    alone = S.ensure_synthetic(tmp_path / "alone", False, n_images=12, size=32, progress=False)
    assert a["synthetic"] == hashlib.sha1((alone / "images.npy").read_bytes()).hexdigest()
