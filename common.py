"""Plumbing shared by the training scripts: the common flags, one-line errors, seeding,
device and precision choice, atomic file writes, run folders, logs and resume checkpoints."""

import argparse
import csv
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2, no traceback."""


class Interrupted(Exception):
    """The run stopped on SIGTERM / SIGINT after saving a checkpoint; exit status 128 + signal."""

    def __init__(self, signum: int, msg: str):
        super().__init__(msg)
        self.signum = signum


def run_cli(main):
    """Call main(); turn a UserError into a one-line message and a non-zero exit.

    Also one line each: a stop on SIGTERM / Ctrl-C (exit 128 + signal number, as a shell reports a
    signal), an interrupt before training started (exit 130) and running out of memory (exit 3,
    with the --bs of the run); see exit_status. Set CASS_DEBUG=1 to see the full traceback instead
    (except for a stop on a signal, which is no error)."""
    try:
        main()
    except (Exception, KeyboardInterrupt) as e:
        status = exit_status(e, sys.argv[1:])
        if status is None or (os.environ.get("CASS_DEBUG") and not isinstance(e, Interrupted)):
            raise
        code, line = status
        print(line, file=sys.stderr)
        sys.exit(code)


def exit_status(e: BaseException, argv) -> tuple:
    """(exit status, one-line message for stderr) of a run of the command line `argv` (without the
    script) that raised `e`, or None when `e` is a bug (its traceback is then the message, exit 1).
    Shared by run_cli and run_all's worker processes, which run many commands in one process."""
    if isinstance(e, Interrupted):
        return 128 + e.signum, f"stopped: {e}"
    if isinstance(e, KeyboardInterrupt):
        return 130, ("error: interrupted (Ctrl-C) before a checkpoint could be saved; outputs written so far "
                     "are complete, rerun the same command to resume")
    if isinstance(e, UserError):
        # raised in a DataLoader worker, the message carries the worker's traceback: keep its last line
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return 2, f"error: {msg.removeprefix(f'{UserError.__module__}.UserError: ')}"
    if isinstance(e, (torch.OutOfMemoryError, MemoryError, RuntimeError)):
        text = str(e)
        oom = isinstance(e, (torch.OutOfMemoryError, MemoryError)) or any(
            s in text for s in ("can't allocate memory", "out of memory", "ALLOC_FAILED"))  # CPU, CUDA, cuDNN/cuBLAS
        if not oom:
            return None
        where = "GPU" if isinstance(e, torch.OutOfMemoryError) or "CUDA" in text or "ALLOC_FAILED" in text else "CPU"
        return 3, (f"error: out of {where} memory at --bs {_flag_value('--bs', argv) or '(the default)'}: try a "
                   f"smaller --bs or --img-size (that is a new run: give it another --out, or --force); the output "
                   f"folder keeps its last complete checkpoint ({text.strip().splitlines()[0][:100]})")
    return None


def _flag_value(flag, argv):
    """The value given to `flag` in the command line `argv`, or None (for messages printed outside main)."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def default_cache_dir() -> str:
    """Where generated data and the decoded-image cache are kept: $CASS_CACHE, else ~/.cache/cass."""
    return os.environ.get("CASS_CACHE") or str(Path.home() / ".cache" / "cass")


def add_common_args(p: argparse.ArgumentParser, *, bs, epochs, img_size, init="imagenet"):
    """The flags every training script shares; defaults differ per script, so they are parameters."""
    g = p.add_argument_group("data and run (shared by every script)")
    add_data_args(g, decoding=True)
    g.add_argument("--img-size", type=int, default=img_size, help="input size in pixels (square)")
    g.add_argument("--bs", type=int, default=bs,
                   help="batch size; under torchrun the GLOBAL batch, split evenly over the processes")
    g.add_argument("--epochs", type=int, default=epochs, help="number of epochs")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
    g.add_argument("--out", default=None, help="output folder (default: a name under runs/ built from the flags)")
    g.add_argument("--init", default=init,
                   help="imagenet (timm weights, needs the Hugging Face hub or its cache), random, "
                        "or PATH to a local weight file (.safetensors or a state dict .pth)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loader worker processes (0 loads in the main process)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda")
    g.add_argument("--force", action="store_true",
                   help="reuse an output folder that holds a run with a different config (its checkpoint "
                        "is discarded)")
    return g


def add_data_args(g, *, decoding=False):
    """The flags that choose the data and its split: --data, --data-root, --cache-dir, --split-file and
    --split-seed (attention_maps.py); decoding=True adds, in between, how the images are read:
    --no-cache, --gpu-aug and --skip-bad-images (the training scripts, through add_common_args)."""
    g.add_argument("--data", default="synthetic",
                   help="data set name: synthetic, synthetic-multilabel, isic2019, brain-mri, dermofit, "
                        "autoimmune, folder, csv, medmnist")
    g.add_argument("--data-root", default=None,
                   help="where the data set lies (for medmnist: the .npz file); not needed for synthetic*")
    g.add_argument("--cache-dir", default=default_cache_dir(),
                   help="where generated data (synthetic*) and the decoded-image cache (decoded/) are kept "
                        "(env CASS_CACHE)")
    if decoding:
        g.add_argument("--no-cache", dest="cache", action="store_false",
                       help="decode the image files at every epoch instead of once into the decoded-image cache "
                            "(<cache-dir>/decoded: uint8 arrays resized to the input size, rebuilt when the files "
                            "change); data held in arrays (synthetic*, medmnist) is never cached")
        g.add_argument("--gpu-aug", action=argparse.BooleanOptionalAction, default=None,
                       help="augment on the device (gpu_aug.py): the loader only reads uint8 images, the random "
                            "transforms run batched on the GPU, same distributions as the CPU path but not the "
                            "same pixels. Default: on with CUDA when the images are in an array (cache or "
                            "synthetic), off on the CPU (where --gpu-aug runs the same code on CPU tensors)")
        g.add_argument("--skip-bad-images", action="store_true",
                       help="leave out image files that cannot be read (corrupt, truncated, not an image) and "
                            "list them, instead of stopping at the first one; they are found before training "
                            "starts (while the decoded-image cache is built, or by a check of every file with "
                            "--no-cache) and dropped from every split part")
    g.add_argument("--split-file", default=None,
                   help="JSON file of train/val/test ids; default runs/splits/<data>-<fingerprint>.json, "
                        "created on first use and reused by every later script and seed")
    g.add_argument("--split-seed", type=int, default=77,
                   help="seed of the stratified 70/10/20 split (77 as in the authors' code); "
                        "kept apart from --seed so every training seed sees the same split")
    return g


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---------------------------------------------------------------- atomic writes

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path, write):
    if not is_main():  # distributed runs: only rank 0 writes files
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    _atomic(path, write)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path, obj):
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_safetensors(path, state_dict):
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp))


def atomic_save_figure(path, fig):
    _atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120,
                                          bbox_inches="tight"))


# ---------------------------------------------------------------- run folders

# Flags that change how a run is executed, not what it computes: a resume may change them.
RUNTIME_FLAGS = ("workers", "device", "force", "cache", "gpu_aug", "cache_dir", "compile", "monitor",
                 "monitor_bank", "monitor_val")


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
    for tmp in out.glob(".*.tmp"):  # see _atomic: never the latest version of anything
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


def load_error_reason(e: Exception) -> str:
    """Why torch / safetensors could not load a file, in one short line (their messages can span
    many lines and carry terminal colour codes)."""
    import re
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if "Weights only load failed" in text:
        if "Unsupported global" in text:
            return "it holds pickled Python objects besides tensors, which are never unpickled"
        detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:80] if \
            "WeightsUnpickler error:" in text else ""
        return f"not a file torch.save wrote ({detail or 'unpickling failed'})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ")[0][:120]  # the first sentence
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


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


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Reseed every RNG at the start of an epoch and return the data loader's generator.

    Each epoch then depends only on (seed, epoch) and the weights, so a run resumed at an
    epoch boundary continues exactly the curve of an uninterrupted one."""
    s = seed * 100_003 + epoch
    seed_everything(s)
    return torch.Generator().manual_seed(s)


# ---------------------------------------------------------------- stopping safely

class StopOnSignal:
    """SIGTERM (a cluster scheduler's pre-emption, `kill`) and SIGINT (Ctrl-C) ask the training loop
    to stop: the current step finishes, a checkpoint of the middle of the epoch is saved, then the
    process exits with status 128 + the signal number. A second signal quits at once (the last
    checkpoint stays). Installed just before the training loop; until then signals act as usual.

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


def save_mid_epoch(out, state: dict, epoch: int, step: int, t0: float, sums: dict, **extra):
    """The checkpoint a signal asks for after `step` of `epoch` (both from 0): `state` with the last
    complete epoch's number and a `partial` record: the steps done, the epoch's running sums
    (tensors, or dicts of them; all-reduced first, so rank 0's hold every process's totals), the
    seconds spent since `t0`, every random generator's state, and `extra` values."""
    for t in _leaves(sums):
        all_reduce_sum(t)
    save_checkpoint(out, {**state, "epoch": epoch - 1, "partial": {
        "step": step + 1, "sums": _tree_map(sums, lambda t: t.cpu()), "rng": rng_state(),
        "seconds": time.perf_counter() - t0, **extra}})


def resume_point(out, ckpt: dict):
    """(first epoch to run, the `partial` record of an epoch a signal stopped, or None) of a loaded
    checkpoint; prints where the run resumes."""
    start, partial = ckpt["epoch"] + 1, ckpt.get("partial")
    print(f"resuming {out} in epoch {start + 1} after its step {partial['step']} (stopped by a signal)"
          if partial else f"resuming {out} after epoch {start}")
    return start, partial


def resume_mid_epoch(partial: dict, device):
    """Restore the random generators saved by save_mid_epoch; returns (the running sums on `device`
    on rank 0 and {} on the other processes, so the epoch's final all-reduce counts them once,
    the seconds already spent)."""
    set_rng_state(partial["rng"])
    return (_tree_map(partial["sums"], lambda t: t.to(device)) if is_main() else {}), partial["seconds"]


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


# ---------------------------------------------------------------- several processes (torchrun)

def setup_distributed(device: torch.device) -> torch.device:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); returns this process's
    device (cuda:LOCAL_RANK on CUDA). Backend nccl on CUDA, gloo on the CPU. On CUDA it also turns
    on cudnn.benchmark (every script trains at fixed sizes). Processes other than
    rank 0 print nothing to stdout and show no progress bars; their errors still reach stderr."""
    import torch.distributed as dist
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) here "
                            "(torchrun --nproc_per_node at most the number of GPUs)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    import atexit
    atexit.register(cleanup_distributed)
    if dist.get_rank() != 0:
        import tqdm
        init = tqdm.tqdm.__init__

        def quiet_init(self, *a, **k):
            k["disable"] = True
            init(self, *a, **k)
        tqdm.tqdm.__init__ = quiet_init
        sys.stdout = open(os.devnull, "w")
    return device


def cleanup_distributed():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True in a single-process run and on rank 0 of a distributed one: the process that writes files."""
    return rank() == 0


def barrier():
    if world_size() > 1:
        import torch.distributed as dist
        dist.barrier()


class main_first:
    """`with main_first():` rank 0 runs the block first (e.g. creates the split file, the decoded
    cache, the output folder); the other processes wait, then run it and find the work done."""

    def __enter__(self):
        if not is_main():
            barrier()

    def __exit__(self, exc_type, *rest):
        if is_main() and exc_type is None:
            barrier()
        return False


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the processes (in place; a no-op in a single process)."""
    if world_size() > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def broadcast_float(x: float) -> float:
    """Rank 0's value of x on every process (so decisions such as early stopping agree)."""
    if world_size() == 1:
        return x
    import torch.distributed as dist
    t = torch.tensor([float(x)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return float(t.item())
