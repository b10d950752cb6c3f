"""A study/run_all.py sweep (tests/tiny_sweep.py, the machinery in tests/sweeps.py) whose main process is
killed leaves no orphans training on: its workers stop at their next step with a checkpoint, and the
same command ends with the uninterrupted sweep's results; a worker that dies is reported with its run."""

import os
import re
import signal
from pathlib import Path

import pytest

from sweeps import (CASS, FROM_CASS, SUPERVISED, Sweep, assert_same_results, assert_stopped_with_a_checkpoint, results,
                    straight, sweeps)  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")]


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
    assert_same_results(results(tmp_path), straight())


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
        assert_same_results(results(tmp_path), straight())
