"""What every script's command line shares: the common flags, one-line errors and exit statuses,
seeding, device and precision choice. Atomic file writes are in runtime/files.py, run folders and
checkpoints in runtime/runs.py, several processes (torchrun) in runtime/distributed.py."""

import argparse
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch

from runtime.errors import Interrupted, UserError  # (defined apart to keep runtime/distributed.py free of this module)


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
    g.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    g.add_argument("--dist-timeout", type=float, default=60, metavar="MIN",
                   help="under torchrun: minutes a process waits in a collective operation before failing "
                        "(init_process_group's timeout; NCCL's default, 10, is too short for rank 0 building "
                        "a large data set's decoded-image cache while the others wait)")
    g.add_argument("--force", action="store_true",
                   help="reuse an output folder that holds a run with a different config (its checkpoint "
                        "is discarded)")
    return g


def add_data_args(g, *, decoding=False):
    """The flags that choose the data and its split: --data, --data-root, --cache-dir, --split-file and
    --split-seed (attention_maps.py); decoding=True adds, in between, how the images are read:
    --no-cache, --gpu-aug and --skip-bad-images (the training scripts, through add_common_args)."""
    g.add_argument("--data", default="synthetic",
                   help="data set name: synthetic, synthetic-multilabel, isic2019, ham10000, brain-mri, dermofit, "
                        "autoimmune, pbc, folder, csv, medmnist")
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
                       help="augment on the device (pipeline/gpu_aug.py): the loader only reads uint8 images, the random "
                            "transforms run batched on the GPU, same distributions as the CPU path but not the "
                            "same pixels. Default: on with CUDA when the images are in an array (cache or "
                            "synthetic), off on the CPU (where --gpu-aug runs the same code on CPU tensors)")
        g.add_argument("--skip-bad-images", action="store_true",
                       help="leave out image files that cannot be read (corrupt, truncated, not an image) and "
                            "list them, instead of stopping at the first one; they are found before training "
                            "starts (while the decoded-image cache is built, or by a check of every file with "
                            "--no-cache) and dropped from every split part")
    g.add_argument("--split-file", default=None,
                   help="JSON file of train/val/test ids; default "
                        "runs/splits/<data>-<fingerprint>-seed<split-seed>.json, created on first use and reused "
                        "by every later script and seed")
    g.add_argument("--train-size", type=int, default=None,
                   help="use a stratified subset of N training images, drawn once (from --split-seed) and saved "
                        "beside the split file (<split>-train<N>.json); validation and test stay whole, and "
                        "--label-frac is then a fraction of the N: how to study 'what if I had only 200 images'")
    g.add_argument("--group-col", default=None,
                   help="csv / autoimmune: a CSV column (e.g. a patient id) whose images must all land in one "
                        "split part; copies found in the images are always kept together")
    g.add_argument("--resplit", action="store_true",
                   help="brain-mri, medmnist: set the curator's train/test split aside and split all images "
                        "ourselves (stratified 70/10/20, every group of copies in one part; default file "
                        "<...>-resplit.json): for a curator's test that leaks too much to judge (check_data.py)")
    g.add_argument("--split-seed", type=int, default=77,
                   help="seed of the stratified 70/10/20 split (77 as in the authors' code); "
                        "kept apart from --seed so every training seed sees the same split")
    return g


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """--device: auto, cpu, cuda or cuda:N. A GPU named by its index becomes the current CUDA device
    (torch.cuda.set_device), so that what runs without naming a device (cuDNN's and cuBLAS's
    handles, torch.cuda.synchronize(), the memory statistics) goes to it, not to cuda:0."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def load_error_reason(e: Exception) -> str:
    """Why torch / safetensors could not load a file, in one short line (their messages can span
    many lines and carry terminal colour codes)."""
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
