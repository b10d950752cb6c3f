"""From a table to batches: `ImageDataset` turns rows of a datasets.ImageTable into tensors through a
transform, each item's random draws seeded by (epoch, row) (`item_seed`, `seeded_rngs`);
`EpochSampler` gives an epoch's order, shared out over torchrun's processes; `make_loader` builds
(and keeps, with worker processes) the DataLoader of an epoch. The pipelines (`cass_pipeline`,
`eval_pipeline`, `dino_pipeline`) pair a dataset with `prepare`, which takes its batches to the
device: with --gpu-aug (pipeline/gpu_aug.py, imported only then) the augmentation runs there."""

import atexit
import functools
import signal
import weakref

import numpy as np
import torch
from PIL import Image

from pipeline.images import array_to_rgb, load_rgb
from pipeline.seeds import item_seed, seeded_rngs  # noqa: F401 (item_seed: re-exported)
from pipeline.table import ImageTable
from pipeline.transforms import cass_augment, eval_transform
from runtime.distributed import rank, world_size
from runtime.errors import UserError


class ImageDataset(torch.utils.data.Dataset):
    """Rows `rows` of `table` as (transform(image), label, row).

    The transform may return a tensor or a list of tensors (multi-crop)."""

    def __init__(self, table: ImageTable, rows, transform):
        self.table, self.rows, self.transform = table, np.asarray(rows, dtype=np.int64), transform

    def __len__(self):
        return len(self.rows)

    def image(self, row: int) -> Image.Image:
        """The row's image; from the decoded cache, with info["source_size"] = the (height, width) of
        the file it was resized from."""
        t = self.table
        if t.array is None:
            return load_rgb(t.paths[row])
        img = array_to_rgb(np.asarray(t.array[row]))
        if "source_sizes" in t.extra:
            img.info["source_size"] = tuple(int(v) for v in t.extra["source_sizes"][row])
        return img

    def __getitem__(self, key):
        """key: a position i, or (epoch_seed, i) from EpochSampler: the transform's random draws then
        come from item_seed(epoch_seed, row) alone (see seeded_rngs)."""
        epoch_seed, i = key if isinstance(key, tuple) else (None, key)
        row = int(self.rows[i])
        label = torch.as_tensor(self.table.labels[row])
        if epoch_seed is None:
            return self.transform(self.image(row)), label, row
        with seeded_rngs(item_seed(epoch_seed, row)):
            return self.transform(self.image(row)), label, row


class EpochSampler(torch.utils.data.Sampler):
    """The order of one epoch: a permutation of 0..n-1 drawn from the epoch seed (shuffle), or 0..n-1.

    shard=True under torch.distributed: process `rank` takes every world-th item of that order,
    padded by wrapping around so every process gets ceil(n / world) items (as DistributedSampler),
    or, with drop_multiple=B (a loader dropping its last incomplete batch, B the global batch),
    first cut to a multiple of B; the processes' batches k together are then exactly the
    single-process batch k of the global batch size, and every process has as many batches. With an epoch seed it yields (epoch_seed, i) pairs, so ImageDataset seeds each
    item's augmentation from (epoch seed, row); without, plain positions."""

    def __init__(self, n: int, shuffle: bool, shard: bool = False, drop_multiple: int = None):
        self.n, self.shuffle, self.epoch_seed, self.drop_multiple, self.start = n, shuffle, None, drop_multiple, 0
        self.rank, self.world = (rank(), world_size()) if shard else (0, 1)

    def set_epoch_seed(self, seed, start: int = 0):
        """Seed of the coming epoch; start > 0 leaves out the first `start` items of this process's
        order (an epoch resumed in the middle: the remaining items are the same as without the stop)."""
        self.epoch_seed = None if seed is None else int(seed)
        self.start = int(start)

    def _total(self):
        if self.world > 1 and self.drop_multiple:
            return self.n - self.n % self.drop_multiple
        return self.n

    def _per_process(self):
        return -(-self._total() // self.world)

    def __len__(self):
        return max(0, self._per_process() - self.start)

    def __iter__(self):
        s = self.epoch_seed
        if self.shuffle:
            if s is None:  # no generator given: a fresh seed from torch's global generator, as DataLoader
                s = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(s))
        else:
            order = torch.arange(self.n)
        if self.world > 1:
            order = order[:self._total()]
            pad = self._per_process() * self.world - len(order)
            order = torch.cat([order, order[:pad]])[self.rank::self.world]
        order = order[self.start:]
        if s is None:
            yield from order.tolist()
        else:
            for i in order.tolist():
                yield (s, i)


_LOADERS = {}  # persistent data loaders (workers > 0), reused by every epoch's make_loader call


def _ignore_stop_signals(worker_id):
    """Loader workers leave SIGINT / SIGTERM to the main process, which saves a checkpoint and then
    shuts them down (a terminal's Ctrl-C, and a scheduler's SIGTERM, reach every process of the job;
    a worker that died of it would make the main process fail before its checkpoint is written)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def close_loaders():
    """Stop every persistent loader's worker processes (and pin-memory threads) and forget the loaders:
    called when a run ends in a process that goes on (run_all's workers, job_runner.run_in_worker),
    and at exit. Registered at exit (by make_loader, with the first loader that has workers) after
    multiprocessing's own exit handler, so it runs first: that one ends workers with SIGTERM, which
    ours ignore."""
    for loader in list(_WORKER_LOADERS):
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # asks each worker to finish, waits, then terminates
            for w in getattr(it, "_workers", []):
                if w.is_alive():
                    w.kill()
    _LOADERS.clear()


_WORKER_LOADERS = weakref.WeakSet()  # every loader with worker processes, for close_loaders


def make_loader(dataset, bs, *, shuffle, workers, drop_last=False, generator=None, device=None, shard=False,
                skip_batches=0):
    """A DataLoader over `dataset` for one epoch.

    generator: the epoch's generator (runs.seed_epoch); its seed fixes the order and every item's
    augmentation (EpochSampler, item_seed). shard=True: under torch.distributed this process loads
    its share only, and `bs` is the GLOBAL batch (each of the world processes gets bs // world).
    With workers > 0 the loader and its worker processes persist: a later call with the same
    dataset and settings returns the same loader, only re-seeded. Memory is pinned on CUDA.
    skip_batches: leave out the epoch's first batches (resuming in the middle of an epoch)."""
    world = world_size() if shard else 1
    if bs % world:
        raise UserError(f"--bs {bs} is the global batch: it must be divisible by the number of "
                        f"processes ({world})")
    pin = device is not None and device.type == "cuda"
    key = (id(dataset), bs, shuffle, workers, drop_last, pin, shard)
    cached = _LOADERS.get(key) if workers > 0 else None
    if cached is not None and cached[0] is dataset:
        loader = cached[1]
    else:
        sampler = EpochSampler(len(dataset), shuffle, shard, bs if drop_last else None)
        loader = torch.utils.data.DataLoader(  # its own generator: the global random stream is not drawn from
            dataset, batch_size=bs // world, sampler=sampler, num_workers=workers, drop_last=drop_last,
            pin_memory=pin, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
            worker_init_fn=_ignore_stop_signals if workers > 0 else None)
        if workers > 0:
            _LOADERS[key] = (dataset, loader)
            if not _WORKER_LOADERS:  # (again after an earlier one was gone: unregister first, so once)
                atexit.unregister(close_loaders)
                atexit.register(close_loaders)
            _WORKER_LOADERS.add(loader)
    loader.sampler.set_epoch_seed(generator.initial_seed() if generator is not None else None,
                                  start=skip_batches * (bs // world))
    return loader


# ---------------------------------------------------------------- pipelines: dataset + prepare

def use_gpu_aug(args, device, table) -> bool:
    """--gpu-aug / --no-gpu-aug, default on with CUDA when the images are in an array of one size."""
    want = getattr(args, "gpu_aug", None)
    if want is None:
        want = device.type == "cuda"
    if want and table.array is None:
        if getattr(args, "gpu_aug", None):
            print("note: --gpu-aug needs the images in an array (drop --no-cache); using the CPU transforms")
        return False
    return bool(want)


def batch_to_device(x, dataset, device):
    """A batch of `dataset`'s loader as model input on `device`: copied (pinned memory, non-blocking),
    and for a gpu_aug.UInt8Dataset transformed there by its device_transform (augmentation or normalisation).
    A list (DINO's crops) becomes a list of device tensors."""
    aug = getattr(dataset, "device_transform", None)
    if aug is not None:
        imgs, u = x
        return aug(imgs.to(device, non_blocking=True), u.to(device, non_blocking=True))
    if isinstance(x, (list, tuple)):
        return [t.to(device, non_blocking=True) for t in x]
    return x.to(device, non_blocking=True)


def _with_prepare(ds, device):
    return ds, functools.partial(batch_to_device, dataset=ds, device=device)


def cass_pipeline(table, rows, img_size, extra, device, gpu: bool):
    """(dataset, prepare): the CASS training view, with prepare(batch from the loader) -> model input
    on `device`. gpu=True: gpu_aug's UInt8Dataset + CassGpuAugment (imported only then); gpu=False:
    ImageDataset + cass_augment (PIL in the loader's workers)."""
    if gpu:
        from pipeline.gpu_aug import CassGpuAugment, UInt8Dataset
        return _with_prepare(UInt8Dataset(table, rows, CassGpuAugment(img_size, extra)), device)
    return _with_prepare(ImageDataset(table, rows, cass_augment(img_size, extra)), device)


def eval_pipeline(table, rows, img_size, device, gpu: bool):
    if gpu:
        from pipeline.gpu_aug import Normalize, UInt8Dataset
        return _with_prepare(UInt8Dataset(table, rows, Normalize(img_size)), device)
    return _with_prepare(ImageDataset(table, rows, eval_transform(img_size)), device)


def dino_pipeline(table, rows, args, device, gpu: bool):
    """(dataset, prepare) for DINO: prepare(batch) -> list of 2 + local_crops device tensors."""
    if gpu:
        from pipeline.gpu_aug import DinoGpuMultiCrop, UInt8Dataset
        aug = DinoGpuMultiCrop(args.img_size, args.local_size, args.local_crops, args.global_scale, args.local_scale)
        return _with_prepare(UInt8Dataset(table, rows, aug), device)
    from pipeline.dino_crops import DinoMultiCrop
    tf = DinoMultiCrop(args.img_size, args.local_size, args.local_crops, args.global_scale, args.local_scale)
    return _with_prepare(ImageDataset(table, rows, tf), device)
