"""Official DINO's multi-crop augmentation (the baseline), torchvision on PIL images: two global and
several local crops, each cut in the geometry of the image's source file (also from the square
decoded cache), and the size the decoded cache needs for them. gpu_aug.DinoGpuMultiCrop is the
batched device version."""

import math
import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
from runtime.errors import UserError


class PILGaussianBlur:
    """Official DINO's blur: with probability p, a PIL Gaussian blur of radius uniform in [0.1, 2] px."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() > self.p:  # official: `do_it = random.random() <= p`
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class PILSolarize:
    """Official DINO's solarisation: with probability p, invert the pixels of value >= 128."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class SourceCrop:
    """torchvision's RandomResizedCrop drawn in the geometry of the image's source file.

    The decoded cache stretches every image to a square; a crop drawn on that square would have
    another aspect ratio than the same crop drawn on the file (a 600 x 450 image: 4:3 squeezed to
    1:1). SourceCrop draws (top, left, height, width) with RandomResizedCrop.get_params on the source
    size (img.info["source_size"], else the image's own size), maps that box onto the image (to
    whole pixels: at most half a pixel off) and resizes it to size x size. On an image that is its own
    source this is torchvision's RandomResizedCrop: the same random draws and the same pixels."""

    def __init__(self, size: int, scale, interpolation=T.InterpolationMode.BICUBIC):
        self.size, self.scale, self.interpolation = size, tuple(scale), interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        h0, w0 = img.info.get("source_size", (img.height, img.width))
        shape_only = torch.empty(1, 1, 1).expand(1, h0, w0)  # get_params reads only the size
        top, left, h, w = T.RandomResizedCrop.get_params(shape_only, self.scale, (3 / 4, 4 / 3))
        sy, sx = img.height / h0, img.width / w0
        y0, x0 = round(top * sy), round(left * sx)
        y1, x1 = max(y0 + 1, round((top + h) * sy)), max(x0 + 1, round((left + w) * sx))
        return TF.resized_crop(img, y0, x0, y1 - y0, x1 - x0, [self.size, self.size], self.interpolation,
                               antialias=True)


class DinoMultiCrop:
    """The multi-crop augmentation of official DINO (facebookresearch/dino, DataAugmentationDINO).

    Returns a list of 2 + n_local tensors: two global crops of `global_size` px (RandomResizedCrop,
    scale `global_scale`, bicubic; as SourceCrop, so crops of a cached image keep the file's aspect
    ratio), then `n_local` local crops of `local_size` px (scale
    `local_scale`). Every crop: horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
    grayscale p=0.2. Gaussian blur p=1.0 on global crop 1; blur p=0.1 and solarise p=0.2 on global
    crop 2; blur p=0.5 on the local crops. Then ToTensor and normalisation (ImageNet by default)."""

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 8,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        for name, (lo, hi) in (("global", global_scale), ("local", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise UserError(f"--{name}-scale {lo} {hi}: expected 0 < min <= max <= 1")
        if global_size < 1 or local_size < 1 or n_local < 0:
            raise UserError("crop sizes must be positive and the number of local crops >= 0")
        flip_and_color_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.global1 = T.Compose([
            SourceCrop(global_size, global_scale), flip_and_color_jitter, PILGaussianBlur(1.0), normalize])
        self.global2 = T.Compose([
            SourceCrop(global_size, global_scale), flip_and_color_jitter, PILGaussianBlur(0.1), PILSolarize(0.2),
            normalize])
        self.local = T.Compose([
            SourceCrop(local_size, local_scale), flip_and_color_jitter, PILGaussianBlur(0.5), normalize])
        self.n_local = n_local

    def __call__(self, img):
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]


def dino_cache_size(global_size: int, local_size: int, global_scale, local_scale) -> int:
    """Cache size for DINO, whose RandomResizedCrop works on the cached image: large enough that
    the smallest crops of either kind are not enlarged, i.e. max(global / sqrt(min global scale),
    local / sqrt(min local scale)), rounded up to a multiple of 32 (448 px at the official
    224 / 96 px, scales 0.4 / 0.05). The cached image is square: like CASS's Resize((s, s)), a
    600 x 450 image is stretched to a square first, which shifts the crops' aspect ratios."""
    need = max(global_size / math.sqrt(global_scale[0]), local_size / math.sqrt(local_scale[0]))
    return int(math.ceil(need / 32) * 32)
