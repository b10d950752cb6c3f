"""Test-only hooks, installed from outside the project's code: the scripts themselves carry none.

    python tests/run_with_hooks.py [--stop-after-epoch N] SCRIPT [ARGS...]

runs SCRIPT as `python SCRIPT ARGS...` would (runpy as __main__, sys.argv and sys.path[0] as for
the script itself) with these hooks:

--stop-after-epoch N  the run ends with exit status 0 as soon as the checkpoint of epoch N (1-based)
    is written, leaving its output folder as a run killed just then would (the resume point, no
    final weights), so that the same command without the runner resumes it.
CASS_INJECT_FAULT=KIND@EPOCH.STEP[,KIND@EPOCH.STEP...] (1-based; in the environment, so torchrun
    passes it to every process) makes the run meet faults just before that training step:
    nan (the batch becomes NaN, so the loss and then the weights do), oom (an out-of-memory error is
    raised), sigterm / sigint (the process sends itself that signal). kill-in-save@EPOCH: the process
    is killed (SIGKILL) in the middle of writing the checkpoint of epoch EPOCH (its "epoch" field
    EPOCH - 1), half of the file on the disk.

Tests that run a script in their own process use stop_after_epoch(N) as a context manager.
How the hooks find their places: every checkpoint goes through runs.save_checkpoint; a training
epoch starts with runs.seed_epoch(seed, epoch), then builds its loader with
loading.make_loader(generator=<that epoch's generator>, skip_batches=<steps already done>), and
passes each batch through the `prepare` of its loading pipeline (cass_pipeline, dino_pipeline) once
per step; the hooks wrap those functions (module attributes: a script imports them after this)."""

import contextlib
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # (not tests/): the project's modules, as for `python ROOT/SCRIPT`

import torch  # noqa: E402

from pipeline import loading  # noqa: E402
from runtime import runs  # noqa: E402


class StoppedAfterEpoch(BaseException):
    """Raised by the stop_after_epoch hook once the asked epoch's checkpoint is written (a
    BaseException, like SystemExit, so that no handler of the scripts takes it for an error)."""


def _wrap(module, name, make):
    """Replace module.name by make(original); returns a function that puts the original back."""
    original = getattr(module, name)
    setattr(module, name, make(original))
    return lambda: setattr(module, name, original)


# ---------------------------------------------------------------- --stop-after-epoch

def install_stop_after_epoch(n: int):
    def make(save_checkpoint):
        def hook(out, state):
            save_checkpoint(out, state)
            if "partial" not in state and state.get("epoch") == n - 1:
                raise StoppedAfterEpoch(n)
        return hook
    return _wrap(runs, "save_checkpoint", make)


@contextlib.contextmanager
def stop_after_epoch(n: int):
    """In-process form of --stop-after-epoch: `with stop_after_epoch(1): script.main(argv)`. The
    script must call runs.save_checkpoint through the module (as finetune.py does)."""
    undo = install_stop_after_epoch(n)
    try:
        yield
    except StoppedAfterEpoch:
        print(f"stopping after epoch {n} as asked (--stop-after-epoch)")
    finally:
        undo()


# ---------------------------------------------------------------- CASS_INJECT_FAULT

def parse_faults(spec: str):
    """([(kind, epoch, step)] 0-based, {epochs of kill-in-save, 1-based as written})."""
    steps, kill_in_save = [], set()
    for item in filter(None, spec.split(",")):
        kind, at = item.split("@")
        if kind == "kill-in-save":
            kill_in_save.add(int(at))
        else:
            e, st = at.split(".")
            steps.append((kind, int(e) - 1, int(st) - 1))
    return steps, kill_in_save


def _save_half_then_die(obj, f, *args, _save=torch.save, **kw):
    """A crash in the middle of writing a file (kill-in-save@EPOCH): half of it reaches the disk,
    then the process is killed."""
    _save(obj, f, *args, **kw)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill_in_save(epochs: set):
    def make(save_checkpoint):
        def hook(out, state):
            if state.get("epoch", -2) + 1 in epochs:
                torch.save = _save_half_then_die  # the process dies inside the write, wherever it writes
            return save_checkpoint(out, state)
        return hook
    return _wrap(runs, "save_checkpoint", make)


def meet_fault(kind: str, x):
    if kind in ("sigterm", "sigint"):
        os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
    elif kind == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by "
                                     "CASS_INJECT_FAULT)")
    elif kind == "nan":
        x = [c * float("nan") for c in x] if isinstance(x, (list, tuple)) else x * float("nan")
    return x


def install_step_faults(faults):
    """faults: [(kind, epoch, step)], 0-based; met in the training step of that epoch and number
    (counted as the loop counts them: from the epoch's first step, also when it resumed later)."""
    where = {"epoch": None, "generator": None, "step": 0}

    def make_seed_epoch(seed_epoch):
        def hook(seed, epoch):
            gen = seed_epoch(seed, epoch)
            where.update(epoch=epoch, generator=gen, step=0)
            return gen
        return hook

    def make_make_loader(make_loader):
        def hook(*args, generator=None, skip_batches=0, **kw):
            if generator is not None and generator is where["generator"]:  # this epoch's training loader
                where["step"] = skip_batches
            return make_loader(*args, generator=generator, skip_batches=skip_batches, **kw)
        return hook

    def make_pipeline(pipeline):
        def hook(*args, **kw):
            dataset, prepare = pipeline(*args, **kw)

            def prepare_with_faults(x):
                x = prepare(x)
                epoch, step = where["epoch"], where["step"]
                where["step"] += 1
                for kind, e, st in faults:
                    if (e, st) == (epoch, step):
                        x = meet_fault(kind, x)
                return x
            return dataset, prepare_with_faults
        return hook

    undo = [_wrap(runs, "seed_epoch", make_seed_epoch), _wrap(loading, "make_loader", make_make_loader),
            _wrap(loading, "cass_pipeline", make_pipeline), _wrap(loading, "dino_pipeline", make_pipeline)]
    return lambda: [u() for u in reversed(undo)]


def install_faults(spec: str):
    steps, kill_in_save = parse_faults(spec)
    if kill_in_save:
        install_kill_in_save(kill_in_save)
    if steps:
        install_step_faults(steps)


# ---------------------------------------------------------------- the runner

def main(argv):
    stop = None
    if argv[:1] == ["--stop-after-epoch"]:
        stop, argv = int(argv[1]), argv[2:]
    if not argv:
        sys.exit(__doc__)
    script = str(Path(argv[0]).resolve())
    install_faults(os.environ.get("CASS_INJECT_FAULT", ""))
    if stop:
        install_stop_after_epoch(stop)
    sys.argv = [script, *argv[1:]]
    sys.path[0] = str(Path(script).parent)
    try:
        runpy.run_path(script, run_name="__main__")
    except StoppedAfterEpoch:
        print(f"stopping after epoch {stop} as asked (--stop-after-epoch)")


if __name__ == "__main__":
    main(sys.argv[1:])
