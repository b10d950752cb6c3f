"""Atomic file writes (all or nothing, rank 0 only under torchrun) and the file lock around
"is it there? else make it and rename it into place"."""

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime.distributed import is_main


def atomic_write(path, write, *, every_process=False):
    """Write `path` all or nothing: write(tmp) fills a temporary file beside it (.<name>.*.tmp, as
    readable as the umask allows), which is then renamed into place; if anything fails the temporary
    file is removed and an older `path` stays as it was. Under torchrun only rank 0 writes, unless
    every_process (the decoded-image cache: whichever process builds it writes it)."""
    if not (every_process or is_main()):
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give outputs the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    umask = os.umask(0)  # (the only way to read it)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def file_lock(path):
    """Hold an exclusive lock on `path` (the hidden file .<name>.lock beside it) for the block; other
    processes asking for it wait. Used around "is it there? else make it and rename it into place"
    (the split file, the decoded-image cache)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def atomic_write_text(path, text: str, *, every_process=False):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write, every_process=every_process)


def atomic_write_json(path, obj, *, every_process=False):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", every_process=every_process)


def atomic_torch_save(path, obj):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))  # (torch.save looked up at each call)


def atomic_save_safetensors(path, state_dict):
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def atomic_save_figure(path, fig):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120,
                                               bbox_inches="tight"))
