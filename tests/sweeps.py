"""The machinery of the tests that stop study/run_all.py sweeps (test_run_all_signals.py,
test_run_all_workers.py): `python tests/tiny_sweep.py tiny` in a session of its own, finding its
processes through /proc, what a finished sweep made, and the uninterrupted sweep they all compare with.

Every process of a sweep is found by its session: the main process is started in a new one, which
its workers and their children inherit."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, session_folder
from runtime.files import file_lock

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


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
    """straight() gives the results of the sweep run without interruption. It is run once per test
    session, when first asked for, and shared by the pytest-xdist workers (under a lock, in a folder
    beside theirs); the tests ask for it last, after their own sweeps."""
    folder = session_folder(tmp_path_factory, "straight-sweep")

    @functools.cache
    def get():
        with file_lock(folder / "done"):
            if not (folder / "done").exists():
                s = Sweep(folder)
                try:
                    assert s.wait() == 0, s.output()
                finally:
                    s.kill_left()
                (folder / "done").touch()
        return results(folder)
    return get


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
