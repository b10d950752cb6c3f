"""Plumbing shared by the training scripts: the common flags, one-line errors, seeding,
device and precision choice, atomic file writes, run folders, logs and resume checkpoints."""

import argparse
import csv
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2, no traceback."""


def run_cli(main):
    """Call main(); turn a UserError into a one-line message and a non-zero exit.

    Set CASS_DEBUG=1 to see the full traceback instead."""
    try:
        main()
    except UserError as e:
        if os.environ.get("CASS_DEBUG"):
            raise
        # raised in a DataLoader worker, the message carries the worker's traceback: keep its last line
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"error: {msg.removeprefix('common.UserError: ')}", file=sys.stderr)
        sys.exit(2)


def add_common_args(p: argparse.ArgumentParser, *, bs, epochs, img_size, init="imagenet"):
    """The flags every script shares; defaults differ per script, so they are parameters."""
    g = p.add_argument_group("data and run (shared by every script)")
    g.add_argument("--data", default="synthetic",
                   help="data set name: synthetic, synthetic-multilabel, isic2019, brain-mri, dermofit, "
                        "autoimmune, folder, csv, medmnist")
    g.add_argument("--data-root", default=None,
                   help="where the data set lies (for medmnist: the .npz file); not needed for synthetic*")
    g.add_argument("--cache-dir", default=os.environ.get("CASS_CACHE", str(Path.home() / ".cache" / "cass")),
                   help="where generated data (synthetic*) and the decoded-image cache (decoded/) are kept "
                        "(env CASS_CACHE)")
    g.add_argument("--no-cache", dest="cache", action="store_false",
                   help="decode the image files at every epoch instead of once into the decoded-image cache "
                        "(<cache-dir>/decoded: uint8 arrays resized to the input size, rebuilt when the files "
                        "change); data held in arrays (synthetic*, medmnist) is never cached")
    g.add_argument("--gpu-aug", action=argparse.BooleanOptionalAction, default=None,
                   help="augment on the device (gpu_aug.py): the loader only reads uint8 images, the random "
                        "transforms run batched on the GPU, same distributions as the CPU path but not the same "
                        "pixels. Default: on with CUDA when the images are in an array (cache or synthetic), "
                        "off on the CPU (where --gpu-aug runs the same code on CPU tensors)")
    g.add_argument("--split-file", default=None,
                   help="JSON file of train/val/test ids; default runs/splits/<data>-<fingerprint>.json, "
                        "created on first use and reused by every later script and seed")
    g.add_argument("--split-seed", type=int, default=77,
                   help="seed of the stratified 70/10/20 split (77 as in the authors' code); "
                        "kept apart from --seed so every training seed sees the same split")
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
RUNTIME_FLAGS = ("workers", "device", "force", "cache", "gpu_aug", "cache_dir", "compile")


def prepare_out_dir(out, config: dict, force: bool, ignore=RUNTIME_FLAGS) -> Path:
    """Create the run folder and write config.json.

    A folder that already holds a config with other settings is refused unless --force,
    so a resume never mixes two different runs."""
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
    elif cfg_path.exists() and force and is_main():
        for stale in ("checkpoint.pt", "checkpoint.prev.pt"):
            (out / stale).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, config)
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
    """The newest readable checkpoint of a run folder, or None. Never unpickles arbitrary objects."""
    out = Path(out)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        path = out / name
        if path.exists():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated file from a crash: fall back to the previous one
                print(f"warning: could not read {path} ({type(e).__name__}); trying the previous checkpoint",
                      file=sys.stderr)
    return None


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Reseed every RNG at the start of an epoch and return the data loader's generator.

    Each epoch then depends only on (seed, epoch) and the weights, so a run resumed at an
    epoch boundary continues exactly the curve of an uninterrupted one."""
    s = seed * 100_003 + epoch
    seed_everything(s)
    return torch.Generator().manual_seed(s)


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
