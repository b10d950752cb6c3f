"""Runs the tests' script commands in forks of one process that has imported torch, timm and the
project's modules once (about 5 s a command saved: most of a small run's time is those imports).

    python tests/script_server.py SOCKET      # started by conftest.py, once per test session

Each request, one JSON line on a connection to SOCKET, is a command line as `python SCRIPT ARGS...`
would run it: {"argv": [SCRIPT, ARGS...], "cwd", "env", "stdout", "stderr" (files), "new_session"}.
The server forks; the child takes that working directory, environment, argv and sys.path[0], sends
its output to the two files and runs SCRIPT with runpy as __main__, then exits as the interpreter
would (atexit handlers, exit status of SystemExit; a traceback and 1 for an uncaught exception).
The server answers {"pid": N} at once and {"returncode": R} when the child has ended (R < 0: killed
by signal -R, as subprocess reports it), so a test can signal the process while it runs.

The server itself never runs a torch operation (a fork keeps no thread pools) and has one thread;
it reaps its children on SIGCHLD."""

import json
import os
import selectors
import signal
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "timm", "numpy", "PIL.Image", "sklearn.metrics", "sklearn.neighbors", "sklearn.linear_model",
           "safetensors.torch", "matplotlib", "tqdm",
           # the project: every module a script imports at start, and the optional ones
           "runtime.cli", "runtime.files", "runtime.distributed", "runtime.runs", "datasets", "pipeline.loading",
           "pipeline.transforms", "pipeline.images", "models", "losses", "evaluation.monitors", "evaluation.metrics",
           "evaluation.probes", "pipeline.decoded_cache", "pipeline.layouts", "pipeline.synthetic_cells",
           "pipeline.gpu_aug", "pipeline.dino_crops", "pipeline.synthetic",
           "pretrain_cass", "pretrain_dino", "finetune", "attention_maps", "study.tables")


def child(request: dict):
    """In the fork: become `python SCRIPT ARGS...` and never return."""
    code = 1
    try:
        for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if request.get("new_session"):
            os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if os.environ.get("OMP_NUM_THREADS"):  # (read by torch when it was imported: here, set it again)
            import torch
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        import runpy
        try:
            if request["argv"][0] == "-m":  # python -m PACKAGE.MODULE ARGS... from the repository root
                sys.argv = [request["argv"][1], *request["argv"][2:]]
                sys.path[0] = str(ROOT)
                runpy.run_module(request["argv"][1], run_name="__main__", alter_sys=True)
            else:
                script = str(Path(request["argv"][0]).resolve())
                sys.argv = [script, *request["argv"][1:]]
                sys.path[0] = str(Path(script).parent)
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:  # as the interpreter does: ends by the signal itself
            import traceback
            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush(), sys.stderr.flush()
        except Exception:
            pass
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code & 0xFF)


def serve(path: str):
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.path.insert(0, str(ROOT))
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: os.write(wake_w, b"x"))
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    running = {}  # pid -> the connection that asked for it
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                with conn.makefile("r") as f:
                    request = json.loads(f.readline())
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for c in running.values():
                        c.close()
                    conn.close()
                    child(request)
                running[pid] = conn
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            else:
                os.read(wake_r, 4096)
                while running:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    conn = running.pop(pid, None)
                    if conn is not None:
                        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                        try:
                            conn.sendall(json.dumps({"returncode": rc}).encode() + b"\n")
                        except OSError:
                            pass
                        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
