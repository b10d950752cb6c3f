"""Shared test setup: offline, CPU, the project root importable, and one synthetic-data cache per
test session (generated once, reused by every test and subprocess through CASS_CACHE)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "tests" / "run_with_hooks.py"  # starts a script with the test hooks (stop after an epoch, faults)
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of several seconds or more (script runs, sweeps); -m 'not slow' leaves them out")


@pytest.fixture(scope="session", autouse=True)
def cass_cache(tmp_path_factory):
    """A per-session cache folder for generated data, exported to subprocesses."""
    cache = os.environ.get("CASS_TEST_CACHE") or str(tmp_path_factory.mktemp("cass_cache"))
    os.environ["CASS_CACHE"] = cache
    return Path(cache)


def run_script(script, *args, cwd, check=True, timeout=600, stop_after_epoch=None):
    """Run one of the project's scripts as a user would; returns the CompletedProcess.

    stop_after_epoch=N: through tests/run_with_hooks.py, which ends the run (exit 0) once epoch N's
    checkpoint is written, as a run killed then would leave its folder."""
    hooks = [str(HOOKS), "--stop-after-epoch", str(stop_after_epoch)] if stop_after_epoch else []
    proc = subprocess.run([sys.executable, *hooks, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc
