"""Running the plan of study/run_all.py: jobs on worker processes that import the scripts once and call
each script's main() with the arguments of its command line, several at a time, each job as soon as
what it needs exists; a stop on SIGTERM / Ctrl-C passed on to every running job."""

import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    kind: str  # data | cass | dino | finetune | maps | tables
    out: Path
    argv: list
    done: tuple = ()  # files whose existence means the job is finished
    needs: tuple = ()  # files that must exist before it can run
    after: tuple = ()  # outs of jobs of this plan that must have finished first (data preparation)
    log: Path = None  # where its output goes (default <out>/run_all.log)

    def log_path(self) -> Path:
        return ROOT / (self.log or self.out / "run_all.log")

    def is_done(self) -> bool:
        return bool(self.done) and all((ROOT / self.out / f).exists() for f in self.done)

    def command(self) -> str:
        """The command line a user would type: `python SCRIPT.py ...` or `python -m PACKAGE.MODULE ...`."""
        head = ["python"] if self.argv[0].endswith(".py") else ["python", "-m"]
        return " ".join(shlex.quote(a) for a in [*head, *self.argv])



RUN_KINDS = ("cass", "dino", "finetune")
SCRIPTS = ("finetune", "pretrain_cass", "pretrain_dino")
JOBS_PER_WORKER = 25  # then a fresh worker process: no slow leaks
STOP_TIMEOUT = 120  # seconds the running jobs get to save a checkpoint after SIGTERM / Ctrl-C


def module_of(script: str) -> str:
    """The module a job's argv[0] names: a top-level script (finetune.py) or a dotted module (study.tables)."""
    return script[:-3] if script.endswith(".py") else script


def _worker_init(threads: int):
    """A worker process: set its CPU threads, then import the scripts once (torch and timm take
    seconds to import; a worker runs many jobs)."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import importlib

    import torch
    if threads:
        torch.set_num_threads(threads)
    for name in SCRIPTS:
        importlib.import_module(name)


def run_in_worker(argv: list, log_path) -> int:
    """Run one job, `python SCRIPT ARGS...`, as SCRIPT's main(ARGS) in this process, its output appended
    to log_path (None: the terminal). Returns the exit status the command line would have had, with
    the same one-line messages (common.exit_status, as common.run_cli: a UserError gives 2, a stop on a
    signal 128 + its number, running out of memory 3)."""
    import contextlib
    import gc
    import importlib
    import signal
    import traceback

    from runtime.cli import exit_status
    with contextlib.ExitStack() as stack:
        if log_path:
            f = stack.enter_context(open(log_path, "a", buffering=1))
            stack.enter_context(contextlib.redirect_stdout(f))
            stack.enter_context(contextlib.redirect_stderr(f))
        try:
            rc = importlib.import_module(module_of(argv[0])).main(argv[1:]) or 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:  # (a stop on Ctrl-C / SIGTERM comes after the run saved its checkpoint)
            status = exit_status(e, argv[1:])
            if status is None:
                traceback.print_exc()
                rc = 1
            else:
                rc, line = status
                print(line, file=sys.stderr)
        finally:  # the next job in this worker starts with the usual signal behaviour
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if "pipeline.loading" in sys.modules:  # and without this job's loaders: their worker processes stopped
                sys.modules["pipeline.loading"].close_loaders()
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()
    return rc


def _worker_loop(conn, threads: int, parent: int):
    """A worker process of execute(): run the jobs (argv, log path) that come on `conn`, answering
    each with its exit status, until None comes or the main process is gone.

    It leaves the main process's process group first: a terminal's Ctrl-C (SIGINT to the whole
    foreground group) then reaches the main process alone, which passes it on once. A run that got
    it twice, from the terminal and from the main process, would quit at once without saving its
    checkpoint (runs.StopOnSignal)."""
    os.setpgrp()
    _stop_when_orphaned(parent)
    _worker_init(threads)
    while True:
        try:
            task = conn.recv()
            if task is None:
                return
            conn.send(run_in_worker(*task))
        except (EOFError, OSError):  # the main process is gone
            return


def _stop_when_orphaned(parent: int):
    """Send this process SIGTERM as soon as its parent, the main process, is gone (killed with
    SIGKILL, say): the running job then saves its checkpoint after its current step and stops,
    instead of training on with nobody waiting for it."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


class Worker:
    """One worker process of execute() (spawned, in its own process group) and the job it runs."""

    def __init__(self, ctx, threads: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_loop, args=(child, threads, os.getpid()), name="run_all-worker")
        self.proc.start()
        child.close()
        self.job, self.since, self.n_jobs = None, 0.0, 0  # job: None when idle

    def run(self, job: Job, log):
        self.conn.send((job.argv, log))
        self.job, self.since, self.n_jobs = job, time.time(), self.n_jobs + 1

    def result(self):
        """The job's exit status once it has ended, a string saying how the worker died if it died,
        None while the job runs."""
        if not self.conn.poll() and self.proc.is_alive():
            return None
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        self.proc.join()
        return _death(self.proc.exitcode)

    def send(self, sig):
        """Send `sig` to the worker; SIGKILL also to its process group (its data loader processes)."""
        if self.proc.exitcode is not None:  # gone already (and its process id free for reuse)
            return
        for kill in ((os.killpg, os.kill) if sig == signal.SIGKILL else (os.kill,)):
            try:
                kill(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):  # (no group yet: it has not called setpgrp)
                pass

    def close(self):
        """End the worker: an idle one is asked to, a busy one is killed."""
        if self.proc.exitcode is None:
            if self.job is None:
                try:
                    self.conn.send(None)
                except OSError:
                    pass
                self.proc.join(10)
            self.send(signal.SIGKILL)
            self.proc.join()
        self.conn.close()


def _death(exitcode) -> str:
    """How a worker process ended, from its exit code."""
    if exitcode is None or exitcode >= 0:
        return f"exited with status {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    return f"killed by {name}" + (" (out of memory?)" if -exitcode == signal.SIGKILL else "")


def _summary(job: Job, rc: int, seconds: float, died: str = None) -> list:
    """Lines to print when a job ends: its last output line, or the tail of its log on failure
    (died: how its worker process died)."""
    logf = job.log_path()
    lines = [ln for ln in logf.read_text().splitlines() if ln.strip()] if logf.exists() else []
    if died or rc != 0:
        shown = logf.relative_to(ROOT) if logf.is_relative_to(ROOT) else logf
        what = f"{seconds:.0f}s): the worker process running it died: {died}" if died else f"exit {rc}, {seconds:.0f}s)"
        return ([f"  FAILED {job.kind} {job.out} ({what}; last lines of {shown}:"]
                + ["    " + ln for ln in lines[-15:]])
    last = lines[-1].strip() if lines else ""
    return [f"  done {job.kind} {job.out} ({seconds:.0f}s): {last[:160] + '...' if len(last) > 160 else last}"]


def execute(jobs: list, n_parallel: int, verbose: bool, keep_going: bool, t0: float,
            stop_timeout: float = STOP_TIMEOUT) -> list:
    """Run the jobs that are not done on n_parallel worker processes, each job as soon as the files
    it needs exist (fine-tuning waits for its pretraining) and its data set is prepared, in plan
    order; the maps and the tables run last. Each job's output goes to <out>/run_all.log (with
    --verbose: the terminal). With several workers each gets cores / n_parallel CPU threads
    (OMP_NUM_THREADS, unless set). Returns the failed jobs; a job whose worker process died (killed,
    out of memory) is one, reported with how the worker died.

    SIGTERM or SIGINT (Ctrl-C) stops the sweep: it is passed on to every running job, which saves a
    checkpoint after its current step and stops (runs.StopOnSignal). After stop_timeout seconds,
    or at a second signal, the jobs still running are killed. Then one line names the stopped runs,
    and SystemExit(128 + the signal number) is raised."""
    import multiprocessing
    from multiprocessing.connection import wait

    todo = [j for j in jobs if not j.is_done()]
    final = [j for j in todo if j.kind in ("maps", "tables")]
    pending = [j for j in todo if j not in final]
    needed = {a for j in pending for a in j.after}
    pending = [j for j in pending if j.kind != "data" or str(j.out) in needed]  # data of finished runs: skip
    n_runs = sum(j.kind in RUN_KINDS for j in pending)
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // n_parallel))
    ctx = multiprocessing.get_context("spawn")
    workers, failed, started, signals = [], [], 0, []

    def busy():
        return [w for w in workers if w.job is not None]

    def start(job):
        nonlocal started
        started += job.kind in RUN_KINDS
        (ROOT / job.out).mkdir(parents=True, exist_ok=True)
        log = None if verbose else job.log_path()
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"\n$ {job.command()}\n")
        tag = f"[{started}/{n_runs}] " if job.kind in RUN_KINDS else ""
        print(f"{tag}start {job.kind} {job.out}  ({time.time() - t0:.0f}s elapsed)", flush=True)
        w = next((w for w in workers if w.job is None), None)
        if w is None:
            w = Worker(ctx, threads if n_parallel > 1 else 0)
            workers.append(w)
        w.run(job, log)

    def reap(timeout=1.0) -> list:
        """[(job, exit status or how its worker died, seconds)] of the jobs that ended within `timeout`."""
        wait([c for w in busy() for c in (w.conn, w.proc.sentinel)], timeout)
        ended = []
        for w in busy():
            rc = w.result()
            if rc is None:
                continue
            ended.append((w.job, rc, time.time() - w.since))
            w.job = None
            if isinstance(rc, str) or w.n_jobs >= JOBS_PER_WORKER:  # dead, or a fresh one next: no slow leaks
                w.close()
                workers.remove(w)
        return ended

    def report(job, rc, seconds):
        died = rc if isinstance(rc, str) else None
        if died and not verbose:
            with open(job.log_path(), "a") as f:
                f.write(f"run_all: the worker process running this job died: {died}\n")
        for line in _summary(job, 1 if died else rc, seconds, died):
            print(line)
        sys.stdout.flush()
        if rc != 0:
            failed.append(job)

    def stop():
        signum = signals[0]
        name = signal.Signals(signum).name
        print(f"\n{name} received: asking {len(busy())} running job(s) to save a checkpoint and stop (up to "
              f"{stop_timeout:g}s; a second signal ends them at once)", flush=True)
        for w in busy():
            w.send(signal.SIGTERM)  # even for SIGINT: outside its training loop a job then ends quietly
        saved, lost = [], []
        deadline = time.time() + stop_timeout
        while busy() and len(signals) < 2 and time.time() < deadline:
            for job, rc, seconds in reap(min(1.0, max(0.0, deadline - time.time()))):
                if rc in (128 + signal.SIGTERM, 128 + signal.SIGINT):
                    saved.append(job)
                elif isinstance(rc, str):  # ended by the signal outside its training loop
                    lost.append(job)
                else:
                    report(job, rc, seconds)
        for w in busy():
            lost.append(w.job)
            w.send(signal.SIGKILL)
        saved.sort(key=jobs.index), lost.sort(key=jobs.index)  # in plan order
        parts = []
        if saved:
            parts.append(f"checkpoint saved by {', '.join(str(j.out) for j in saved)}")
        if lost:
            parts.append("killed without a new checkpoint (resumes from its last saved epoch): "
                         + ", ".join(str(j.out) for j in lost))
        print(f"stopped by {name}: {'; '.join(parts) or 'no job was running'}; run the same command again to "
              "resume", flush=True)
        raise SystemExit(128 + signum)

    handlers = {s: signal.signal(s, lambda signum, frame: signals.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while (pending or busy()) and not signals:
            stop_new = failed and not keep_going
            taken = {str(j.out) for j in pending} | {str(w.job.out) for w in busy()} | {str(j.out) for j in failed}
            while not stop_new and pending and len(busy()) < n_parallel:
                ready = next((j for j in pending if all((ROOT / n).exists() for n in j.needs)
                              and not taken.intersection(j.after)), None)
                if ready is None:
                    break
                pending.remove(ready)
                start(ready)
            if not busy():
                for j in pending if not stop_new else []:
                    missing = next((n for n in j.needs if not (ROOT / n).exists()), None)
                    why = f"{missing} is missing" if missing else "its data preparation failed"
                    print(f"  skipped {j.kind} {j.out}: {why} (a failed run)")
                break
            for ended in reap():
                report(*ended)
        for j in final if not signals else []:
            missing = [n for n in j.needs if not (ROOT / n).exists()]
            if missing:
                print(f"  skipped {j.kind}: {missing[0]} is missing")
            elif j.kind == "tables" or keep_going or not failed:
                start(j)
                while busy() and not signals:
                    for ended in reap():
                        report(*ended)
            if signals:
                break
        if signals:
            stop()
    finally:
        for w in workers:
            w.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    return failed

