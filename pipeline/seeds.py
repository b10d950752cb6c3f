"""Each image's random draws, seeded by (epoch, row): the seed (`item_seed`) and the context that
seeds the CPU generators with it (`seeded_rngs`). Below both the loaders (pipeline/loading.py) and
the device augmentations (pipeline/gpu_aug.py), which draw from the same seeds."""

import random

import numpy as np
import torch


def item_seed(epoch_seed: int, row: int) -> int:
    """The seed of one image's augmentation in one epoch (a splitmix64 mix of the two numbers).

    It depends on the image's row, not on its position in the batch, the data loader worker or the
    process that loads it: the same epoch gives the same views with 0 or 8 workers, 1 or 4 processes,
    on the CPU path or (its own random numbers) the GPU one."""
    z = (int(epoch_seed) * 0x9E3779B97F4A7C15 + int(row) + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1  # 63 bits: a valid torch seed


class seeded_rngs:
    """Seed the CPU random generators the transforms use (torch's default CPU generator, `random`,
    numpy's global one) for one item. In the main process (workers=0) their previous states are
    restored afterwards, so the training loop's own random stream is not disturbed; CUDA generators
    are never touched."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.saved = None
        if torch.utils.data.get_worker_info() is None:
            self.saved = (torch.default_generator.get_state(), random.getstate(), np.random.get_state())
        torch.default_generator.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

    def __exit__(self, *exc):
        if self.saved is not None:
            torch.default_generator.set_state(self.saved[0])
            random.setstate(self.saved[1])
            np.random.set_state(self.saved[2])
        return False
