"""The image transforms of CASS and of fine-tuning: the paper's CASS augmentation and the evaluation
transform, torchvision on PIL images (DINO's multi-crop: pipeline/dino_crops.py; the batched device
versions of both: pipeline/gpu_aug.py)."""

from torchvision import transforms as T

from runtime.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
