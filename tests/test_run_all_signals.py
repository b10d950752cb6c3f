"""Stopping study/run_all.py, through its command line, on a sweep of three short runs (tests/tiny_sweep.py,
the machinery in tests/sweeps.py): SIGTERM to its main process or Ctrl-C to its process group reaches
every worker once, each running run saves a checkpoint, the main process exits with 128 + the signal
and leaves no process behind, and the same command then ends with the results of an uninterrupted
sweep. A second signal or --stop-timeout ends stubborn jobs at once. And two processes that need the
same split file and decoded-image cache at once make each once. (A killed main process and a worker
that dies: test_run_all_workers.py.)"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from sweeps import (CASS, SUPERVISED, assert_same_results, assert_stopped_with_a_checkpoint, results, stop_line,
                    straight, sweeps)  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")]


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
        assert_same_results(results(tmp_path), straight())


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
