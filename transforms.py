"""The image transforms: the paper's CASS augmentation and evaluation transform, and official
DINO's multi-crop augmentation (the baseline), all torchvision on PIL images; gpu_aug.py has their
batched device versions."""

import math
import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from common import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- CASS and evaluation

def cass_augment(img_size: int, extra=(), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The single view CASS feeds to both arms (Appendix C.5.2, as in the authors' code).

    Note RandomPerspective keeps torchvision's own p=0.5 inside its RandomApply(p=0.3), as in
    the authors' chain. `extra` adds the Table 9 ablations: 'blur' (Gaussian blur, p=0.5,
    sigma 0.1-2, BYOL's kernel of 10% of the image) and 'solarize' (threshold 0.5, p=0.2)."""
    unknown = set(extra) - {"blur", "solarize"}
    if unknown:
        raise UserError(f"--extra-aug: unknown augmentation(s) {sorted(unknown)} (choose blur, solarize)")
    ops = [
        T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.RandomApply([T.ColorJitter(0.2, 0.2, 0.2), T.RandomPerspective(0.2)], p=0.3),
        T.RandomApply([T.ColorJitter(0.2, 0.2, 0.2), T.RandomAffine(10)], p=0.3),
        T.RandomVerticalFlip(0.3),
        T.RandomHorizontalFlip(0.3),
    ]
    if "blur" in extra:
        k = max(3, int(0.1 * img_size) // 2 * 2 + 1)
        ops.append(T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
    if "solarize" in extra:
        ops.append(T.RandomSolarize(128, p=0.2))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def eval_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return T.Compose([
        T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ToTensor(), T.Normalize(mean, std)])


# ---------------------------------------------------------------- DINO multi-crop (the baseline)

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
