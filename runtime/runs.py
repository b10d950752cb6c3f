"""Run folders, logs and resume checkpoints: the output folder of a run and its config, the per-epoch
log, checkpoints written atomically with a fallback to the previous one, epochs seeded so that a
resumed run continues the same curve, stopping safely on SIGTERM / Ctrl-C (a checkpoint of the
middle of the epoch and its resumption), and the watch on non-finite losses; TrainingGuard puts the
last three together for a training loop."""

import csv
import functools
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runtime.cli import load_error_reason, seed_everything
from runtime.distributed import all_gather_objects, all_reduce_sum, barrier, is_main, rank, world_size
from runtime.errors import Interrupted, UserError
from runtime.files import atomic_torch_save, atomic_write_json, atomic_write_text

# ---------------------------------------------------------------- run folders

# Flags that change how a run is executed, not what it computes: a resume may change them.
RUNTIME_FLAGS = ("workers", "device", "force", "cache", "gpu_aug", "cache_dir", "compile", "monitor",
                 "monitor_bank", "monitor_val", "dist_timeout")


def check_out_dir(out, config: dict, force: bool, ignore=RUNTIME_FLAGS) -> Path:
    """Refuse an output folder whose config.json holds other settings (unless --force), so a resume
    never mixes two different runs. Writes nothing: called before the data are read, so a mistake
    costs seconds, and a run that fails on bad input leaves no folder behind."""
    out = Path(out)
    config = json.loads(json.dumps(config))  # compare as stored: tuples become lists
    cfg_path = out / "config.json"
    if cfg_path.exists() and not force:
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{cfg_path} is not valid JSON; remove it or pass --force")
        differ = sorted(k for k in set(old) | set(config)
                        if k not in ignore and old.get(k) != config.get(k))
        if differ:
            raise UserError(f"--out {out} holds a different run (differs in: {', '.join(differ)}); "
                            "choose another --out or pass --force to start it afresh")
    return out


def prepare_out_dir(out, config: dict, force: bool, ignore=RUNTIME_FLAGS) -> Path:
    """Check the folder (check_out_dir), create it and write config.json; with --force, drop the
    old run's checkpoints. Temporary files left by a write that a crash interrupted are removed."""
    out = check_out_dir(out, config, force, ignore)
    if not is_main():
        return out
    if force:
        for stale in ("checkpoint.pt", "checkpoint.prev.pt"):
            (out / stale).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp"):  # see common.atomic_write: never the latest version of anything
        tmp.unlink(missing_ok=True)
    atomic_write_json(out / "config.json", config)
    return out


class CsvLog:
    """Per-epoch CSV log, rewritten atomically each epoch so it always parses.

    On resume the rows of epochs that will be re-run are dropped."""

    def __init__(self, path, keep_epochs_below: int = 0):
        self.path = Path(path)
        self.rows = []
        if self.path.exists() and keep_epochs_below > 0:
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < keep_epochs_below]

    def append(self, row: dict):
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        lines = [",".join(fields)]
        for r in self.rows:
            lines.append(",".join(str(r.get(k, "")) for k in fields))
        atomic_write_text(self.path, "\n".join(lines) + "\n")


def read_csv_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- resume checkpoints

def save_checkpoint(out: Path, state: dict):
    """Write checkpoint.pt atomically; the previous one is kept as checkpoint.prev.pt until then."""
    out = Path(out)
    if not is_main():
        return
    ckpt, prev = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    if ckpt.exists():
        os.replace(ckpt, prev)
    atomic_torch_save(ckpt, state)


def load_checkpoint(out: Path):
    """The newest readable checkpoint of a run folder, or None when it has none.

    Loads with weights_only=True: tensors and plain Python values, never arbitrary objects. An
    unreadable checkpoint.pt (cut short by a disk fault, or not a checkpoint) falls back to
    checkpoint.prev.pt with a warning; when no checkpoint can be read at all, the run stops rather
    than silently starting again over the folder's results."""
    out = Path(out)
    errors = []
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        path = out / name
        if path.exists():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                reason = load_error_reason(e)
                errors.append(f"{path}: {reason}")
                print(f"warning: cannot read {path} ({reason}); trying the previous checkpoint", file=sys.stderr)
    if errors:
        raise UserError(f"no readable checkpoint in {out} ({errors[0]}); move the folder away or pass --force to "
                        "start the run afresh")
    return None


# Optimiser options that belong to the device a run is on, not to the one that wrote its checkpoint
DEVICE_OPTIONS = ("fused", "foreach", "capturable")


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict):
    """opt.load_state_dict(saved) for a checkpoint another device may have written (a GPU run resumed
    on the CPU, or a CPU run on a GPU): the options that depend on the device (fused, foreach,
    capturable) stay those this run chose for its own, and every state tensor shaped like its
    parameter (Adam's moments) takes the parameter's memory layout (a CNN's weights are channels_last
    on CUDA, contiguous on the CPU): a fused kernel pairs the elements of a parameter and of its
    moments by their places in memory, so moments in another layout would be mixed up."""
    if len(saved.get("param_groups", [])) == len(opt.param_groups):
        saved = dict(saved, param_groups=[dict(g, **{k: mine[k] for k in DEVICE_OPTIONS if k in mine})
                                          for g, mine in zip(saved["param_groups"], opt.param_groups)])
    opt.load_state_dict(saved)  # (moves the state to each parameter's device and dtype, keeping its strides)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)  # p's layout, the same values


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Reseed every RNG at the start of an epoch and return the data loader's generator.

    Each epoch then depends only on (seed, epoch) and the weights, so a run resumed at an
    epoch boundary continues exactly the curve of an uninterrupted one. The loader's generator (the
    data order; each image's augmentation is seeded from it) is the same on every process under
    torchrun; the global generators (drop path, the collapse guard's noise) are seeded per process,
    as official DINO's seed + rank, so the processes do not repeat each other's draws (rank 0 draws
    as a single process does)."""
    s = seed * 100_003 + epoch
    seed_everything(s + 1_000_003 * rank())
    return torch.Generator().manual_seed(s)


# ---------------------------------------------------------------- stopping safely

class StopOnSignal:
    """SIGTERM (a cluster scheduler's pre-emption, `kill`) and SIGINT (Ctrl-C) ask the training loop
    to stop: the current step finishes, a checkpoint of the middle of the epoch is saved, then the
    process exits with status 128 + the signal number. A second signal quits at once (the last
    checkpoint stays). Installed just before the training loop; until then signals act as usual, and
    the script's main() puts the handlers it found back when it ends (restores_signal_handlers).

    requested(step) is what the loop asks after each step. Under torchrun every process must stop
    after the same step, so they agree by an all-reduce, every 20 steps (and whenever step is None)."""

    def __init__(self, device):
        self.device, self.signum = device, None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.signum is not None:  # the second one: act as if nothing had been installed
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping "
              "(send it again to quit at once)", file=sys.stderr, flush=True)

    def requested(self, step=None) -> bool:
        if world_size() == 1:
            return self.signum is not None
        if step is not None and step % 20:
            return False
        anyone = all_reduce_sum(torch.tensor([float(self.signum is not None)], device=self.device)).item() > 0
        if anyone and self.signum is None:
            self.signum = 15  # another process got it: stop together
        return anyone

    def stop(self, out, where: str):
        """Raise Interrupted after the checkpoint of `where` (e.g. 'epoch 3 step 40') is saved.
        Under torchrun every process first waits for rank 0's write: torchrun ends the others with
        SIGTERM as soon as one exits non-zero."""
        barrier()
        raise Interrupted(self.signum, f"{signal.Signals(self.signum).name} after {where}: checkpoint saved "
                                       f"in {out}; rerun the same command to continue from there")


def restores_signal_handlers(main):
    """Decorates a script's main(): the SIGTERM and SIGINT handlers in place when it is called are put
    back when it returns or raises. Without it, a run started from Python (a notebook, a sweep in one
    process) would leave its StopOnSignal behind, which only notes a signal: a later Ctrl-C or SIGTERM
    would seem to do nothing, in that process and in the ones it forks."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        found = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return main(*args, **kwargs)
        finally:
            for s, handler in found.items():
                if handler is not None and signal.getsignal(s) is not handler:  # (None: set outside Python)
                    signal.signal(s, handler)
    return wrapped


def save_mid_epoch(out, state: dict, epoch: int, step: int, t0: float, sums: dict, **extra):
    """The checkpoint a signal asks for after `step` of `epoch` (both from 0): `state` with the last
    complete epoch's number and a `partial` record: the steps done, the epoch's running sums
    (tensors, or dicts of them; all-reduced first, so rank 0's hold every process's totals), the
    seconds spent since `t0`, every random generator's state, and `extra` values."""
    for t in _leaves(sums):
        all_reduce_sum(t)
    rngs = all_gather_objects(rng_state())  # (torchrun: each process's own generators, resumed by each)
    save_checkpoint(out, {**state, "epoch": epoch - 1, "partial": {
        "step": step + 1, "sums": _tree_map(sums, lambda t: t.cpu()), "rng": rngs[0],
        **({"rng_ranks": rngs} if len(rngs) > 1 else {}), "seconds": time.perf_counter() - t0, **extra}})


def resume_point(out, ckpt: dict):
    """(first epoch to run, the `partial` record of an epoch a signal stopped, or None) of a loaded
    checkpoint; prints where the run resumes."""
    start, partial = ckpt["epoch"] + 1, ckpt.get("partial")
    print(f"resuming {out} in epoch {start + 1} after its step {partial['step']} (stopped by a signal)"
          if partial else f"resuming {out} after epoch {start}")
    return start, partial


def resume_mid_epoch(partial: dict, device):
    """Restore the random generators saved by save_mid_epoch; returns (the running sums on `device`:
    the saved ones on rank 0 and zeros of the same shapes on the other processes, so the epoch's
    final all-reduce counts them once and every process holds the same sums, even when the stop came
    after the epoch's last step and no step is left to create them; the seconds already spent)."""
    rngs = partial.get("rng_ranks")  # (torchrun: every process's; with another number of processes, rank 0's)
    set_rng_state(rngs[rank()] if rngs and len(rngs) == world_size() else partial["rng"])
    main = is_main()
    sums = _tree_map(partial["sums"], lambda t: t.to(device) if main else torch.zeros_like(t, device=device))
    return sums, partial["seconds"]


def _leaves(tree):
    return [t for v in tree.values() for t in (_leaves(v) if isinstance(v, dict) else [v])]


def _tree_map(tree: dict, fn) -> dict:
    return {k: _tree_map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


class LossWatch:
    """Notices the first step whose loss is NaN or infinite without a host sync per step: the step
    number is kept on the device, and check() (one sync) raises with the epoch and step."""

    def __init__(self, device):
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, loss: torch.Tensor, step: int):
        bad = ~torch.isfinite(loss.detach().float()) & (self.first < 0)
        self.first = torch.where(bad, step, self.first)

    def check(self, epoch: int, out, hint="try a lower --lr"):
        bad = all_reduce_sum((self.first >= 0).to(torch.int64).reshape(1))  # torchrun: any process
        if bad.item() > 0:
            at = f"step {int(self.first.item()) + 1}" if self.first.item() >= 0 else "a step (another process)"
            raise UserError(f"loss is not finite (nan or inf) at epoch {epoch + 1} {at}; stopped, the last good "
                            f"checkpoint in {out} is kept ({hint})")


class TrainingGuard:
    """The safety plumbing of a training loop, the same in the three scripts: stopping on SIGTERM /
    Ctrl-C with a checkpoint of the middle of the epoch (StopOnSignal, save_mid_epoch), resuming from
    it (resume_mid_epoch), and the watch on non-finite losses (LossWatch). A loop then reads

        guard = TrainingGuard(out, device, train_state, partial)  # partial: from resume_point
        for epoch in range(start_epoch, epochs):
            loader = make_loader(..., generator=seed_epoch(seed, epoch), skip_batches=guard.skip)
            sums = guard.start_epoch(epoch, {"sums": torch.zeros(2, device=device)})
            for step, batch in enumerate(tqdm(loader, initial=guard.skip), start=guard.skip):
                ...  # forward, loss, backward, step; add to the tensors of `sums` in place
                guard.step(loss, step, bar)
            guard.end_epoch()  # raises on a non-finite loss
            ...  # log the epoch, save_checkpoint
            guard.stop_if_asked()

    train_state() returns what a checkpoint holds besides the epoch; `sums` are the epoch's running
    sums (tensors, or dicts of them, filled in place), saved with a mid-epoch checkpoint and given
    back when the run resumes there. guard.seconds() is the time the epoch has taken, also across a
    stop and resume."""

    def __init__(self, out, device, train_state, partial=None, hint="try a lower --lr"):
        self.out, self.device, self.train_state, self.hint = out, device, train_state, hint
        self.signals, self.watch = StopOnSignal(device), LossWatch(device)
        self.partial, self.epoch, self.sums, self.extra, self.t0 = partial, None, {}, {}, None

    @property
    def skip(self) -> int:
        """Steps of this epoch done before a signal stopped it (0 but for the epoch a run resumes in)."""
        return self.partial["step"] if self.partial else 0

    def start_epoch(self, epoch: int, sums: dict, **extra) -> dict:
        """Call once the epoch's loader is built. Returns `sums`, or the epoch's sums so far when the run
        resumes in its middle (then also every random generator is restored). `extra` (e.g. lr=...)
        is saved with a mid-epoch checkpoint; guard.extra holds it, as saved when resuming."""
        self.epoch, self.sums, self.extra, self.t0 = epoch, sums, extra, time.perf_counter()
        if self.partial:
            done, spent = resume_mid_epoch(self.partial, self.device)
            self.sums = {k: done.get(k, v) for k, v in sums.items()}
            self.extra = {k: self.partial.get(k, v) for k, v in extra.items()}
            self.t0 -= spent
        return self.sums

    def step(self, loss: torch.Tensor, step: int, bar=None):
        """After each step: note a non-finite loss (checked, with the bar's loss shown, every 20 steps:
        the only host sync inside the epoch); on a signal, save the middle of the epoch and stop."""
        self.watch.update(loss, step)
        if step % 20 == 0:
            self.watch.check(self.epoch, self.out, self.hint)
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if self.signals.requested(step):
            self.watch.check(self.epoch, self.out, self.hint)  # never save weights that a NaN has reached
            save_mid_epoch(self.out, self.train_state(), self.epoch, step, self.t0, self.sums, **self.extra)
            self.signals.stop(self.out, f"epoch {self.epoch + 1} step {step + 1}")

    def end_epoch(self):
        """After the epoch's last step: raises if any of its losses was not finite."""
        self.watch.check(self.epoch, self.out, self.hint)
        self.partial = None

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def stop_if_asked(self):
        """After the epoch's checkpoint: stop if a signal came during the epoch's end."""
        if self.signals.requested():
            self.signals.stop(self.out, f"epoch {self.epoch + 1}")


def rng_state() -> dict:
    """Every random generator the training loop draws from, in a form torch.load(weights_only=True)
    reads back: saved with a checkpoint taken in the middle of an epoch."""
    np_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "random": random.getstate(),
            "numpy": [np_state["state"]["key"].tolist(), np_state["state"]["pos"], np_state["has_gauss"],
                      np_state["gauss"]]}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["random"])
    key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": np.asarray(key, dtype=np.uint32),
                                                               "pos": pos},
                         "has_gauss": has_gauss, "gauss": gauss})
