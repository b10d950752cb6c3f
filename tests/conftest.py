"""Shared test setup: offline, CPU, the project root importable, one synthetic-data cache per test
session (generated once, reused by every test and subprocess through CASS_CACHE), and the scripts'
command lines run as a user would (start_script, run_script), through tests/script_server.py: a
process that has imported torch and timm once forks for each command (about 7 s saved a command here;
tests/test_faults.py + test_pretrain_cass.py: 2 min 50 s instead of 9 min 6 s). CASS_TEST_SERVER=0
runs each command in a fresh interpreter instead."""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "tests" / "run_with_hooks.py"  # starts a script with the test hooks (stop after an epoch, faults)
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: the cores shared out, not N times all of them
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


# The files whose tests take longest, in that order, start first (the rest follow in their usual order;
# test_run_all_workers.py after test_distributed.py, so that by then the other worker has made the
# uninterrupted sweep both sweep files compare with, tests/sweeps.py):
# with pytest-xdist (-n; pytest.ini: --dist loadfile, one worker takes a whole file) the workers then end
# close together instead of one waiting for the other's last long file.
SLOWEST_FIRST = ("test_run_all_signals.py", "test_distributed.py", "test_run_all_workers.py", "test_faults.py",
                 "test_finetune.py", "test_run_all.py", "test_cass_options.py", "test_imports.py",
                 "test_pretrain_cass.py", "test_norm.py", "test_copy_a_script.py", "test_synthetic.py",
                 "test_bad_input.py", "test_datasets.py", "test_dino.py", "test_monitors.py", "test_attention_maps.py")


def pytest_collection_modifyitems(session, config, items):
    first = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # (stable: a file's order is kept)


def session_folder(tmp_path_factory, name: str) -> Path:
    """A folder of this test session, shared by its pytest-xdist workers (beside their own temporary
    folders): what is made in it once (under a lock) serves them all."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session", autouse=True)
def cass_cache(tmp_path_factory):
    """A per-session cache folder for generated data, exported to subprocesses. Under pytest-xdist the
    workers share one (the generator makes the data once, under a lock)."""
    cache = os.environ.get("CASS_TEST_CACHE") or str(session_folder(tmp_path_factory, "cass_cache"))
    os.environ["CASS_CACHE"] = cache
    return Path(cache)


class _Server:
    """The session's script server (started on first use) and its socket."""
    proc, socket, dir = None, None, None

    lock = threading.Lock()  # (tests start commands from several threads at once)

    @classmethod
    def address(cls):
        if os.environ.get("CASS_TEST_SERVER", "1") == "0":
            return None
        with cls.lock:
            if cls.proc is None or cls.proc.poll() is not None:
                cls.dir = tempfile.mkdtemp(prefix="cass-script-server-")
                cls.socket = os.path.join(cls.dir, "socket")
                cls.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "script_server.py"), cls.socket],
                                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
                if cls.proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"tests/script_server.py did not start (exit {cls.proc.wait()})")
            return cls.socket

    @classmethod
    def stop(cls):
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.kill()
            cls.proc.wait()
        cls.proc = None
        if cls.dir is not None:
            shutil.rmtree(cls.dir, ignore_errors=True)


class ServedProcess:
    """A command run by the script server, with Popen's interface as far as the tests use it: pid,
    poll(), wait(timeout), communicate(timeout) -> (stdout, stderr) text, returncode."""

    def __init__(self, argv, cwd, env, new_session, address):
        self.args, self.returncode, self._buf = argv, None, b""
        self._dir = tempfile.mkdtemp(prefix="run-", dir=_Server.dir)
        self._out, self._err = os.path.join(self._dir, "stdout"), os.path.join(self._dir, "stderr")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(address)
        self._sock.sendall(json.dumps({"argv": argv, "cwd": str(cwd), "env": env, "stdout": self._out,
                                       "stderr": self._err, "new_session": new_session}).encode() + b"\n")
        self.pid = self._message(None)["pid"]

    def _message(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._sock], [], [], left)[0]:
                return None
            chunk = self._sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"the script server ended while running {self.args}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def poll(self):
        if self.returncode is None:
            msg = self._message(0)
            if msg is not None:
                self.returncode = msg["returncode"]
                self._sock.close()
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            msg = self._message(timeout)
            if msg is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = msg["returncode"]
            self._sock.close()
        return self.returncode

    def communicate(self, timeout=None):
        self.wait(timeout)
        return Path(self._out).read_text(errors="replace"), Path(self._err).read_text(errors="replace")

    def kill(self):
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


def start_script(script, *args, cwd, env=None, hooks=None, new_session=False):
    """Start `python ROOT/SCRIPT ARGS...` in `cwd` with `env` (default this process's environment), or
    with hooks (a list of its flags, maybe empty) `python tests/run_with_hooks.py HOOKS... ROOT/SCRIPT
    ARGS...`; for a dotted module name (study.tables), `python -m MODULE ARGS...` as run from the
    repository root. stdin is empty, stdout and stderr are kept. Returns a ServedProcess of the script
    server, or with CASS_TEST_SERVER=0 a subprocess.Popen."""
    env = dict(os.environ if env is None else env)
    if script.endswith(".py"):
        target = [str(ROOT / script)]
    else:
        target = ["-m", script]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    argv = [*([str(HOOKS), *map(str, hooks)] if hooks is not None else []), *target, *map(str, args)]
    address = _Server.address()
    if address is None:
        return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=new_session)
    return ServedProcess(argv, cwd, env, new_session, address)


@pytest.fixture(scope="session", autouse=True)
def script_server():
    yield
    _Server.stop()


def run_script(script, *args, cwd, check=True, timeout=600, stop_after_epoch=None, env=None, hooks=None):
    """Run one of the project's scripts as a user would; returns a subprocess.CompletedProcess.

    stop_after_epoch=N: through tests/run_with_hooks.py, which ends the run (exit 0) once epoch N's
    checkpoint is written, as a run killed then would leave its folder."""
    if stop_after_epoch:
        hooks = [*(hooks or ()), "--stop-after-epoch", stop_after_epoch]
    p = start_script(script, *args, cwd=cwd, env=env, hooks=hooks)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    proc = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc
