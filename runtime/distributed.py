"""Several processes (torchrun): joining the process group, this process's rank, and the few
collective operations the scripts need. In a single process every helper is a no-op."""

import atexit
import datetime
import os
import sys

import torch
import torch.distributed as dist
import tqdm

from runtime.errors import UserError

DEFAULT_TIMEOUT_MIN = 60  # rank 0 alone builds the decoded-image cache while the others wait (ISIC: minutes)


def setup_distributed(device: torch.device, timeout_min: float = DEFAULT_TIMEOUT_MIN) -> torch.device:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); returns this process's
    device (cuda:LOCAL_RANK on CUDA). Backend nccl on CUDA, gloo on the CPU, with a timeout of
    timeout_min minutes for every collective operation (--dist-timeout: NCCL's default of 10 minutes
    is shorter than the wait of the other processes while rank 0 builds the decoded-image cache in
    main_first). On CUDA it also turns on cudnn.benchmark (every script trains at fixed sizes).
    Processes other than rank 0 print nothing to stdout and show no progress bars; their errors
    still reach stderr."""
    if not timeout_min > 0:
        raise UserError(f"--dist-timeout {timeout_min}: give a positive number of minutes")
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
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=timeout_min))
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=timeout_min))
    atexit.register(cleanup_distributed)
    if dist.get_rank() != 0:
        init = tqdm.tqdm.__init__

        def quiet_init(self, *a, **k):
            k["disable"] = True
            init(self, *a, **k)
        tqdm.tqdm.__init__ = quiet_init
        sys.stdout = open(os.devnull, "w")
    return device


def _joined() -> bool:
    """Whether this process is in a process group (torchrun, after setup_distributed)."""
    return dist.is_available() and dist.is_initialized()


def cleanup_distributed():
    if _joined():
        dist.destroy_process_group()


def world_size() -> int:
    """The number of processes of the run: 1 unless started by torchrun."""
    return dist.get_world_size() if _joined() else 1


def rank() -> int:
    return dist.get_rank() if _joined() else 0


def is_main() -> bool:
    """True in a single-process run and on rank 0 of a distributed one: the process that writes files."""
    return rank() == 0


def barrier():
    if world_size() > 1:
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


def all_gather_objects(obj) -> list:
    """Every process's `obj` (picklable), in rank order; [obj] in a single process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the processes (in place; a no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_float(x: float) -> float:
    """Rank 0's value of x on every process (so decisions such as early stopping agree)."""
    if world_size() == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return float(t.item())
