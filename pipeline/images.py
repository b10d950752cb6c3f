"""Image files: reading one as 8-bit RGB (grayscale, palette, alpha, 16-bit and float images
included), with a one-line error naming a file that cannot be read. Finding all such files at once
and the decoded-image cache are in pipeline/decoded_cache.py."""

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from runtime.errors import UserError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # (PIL's default, made sure of) a truncated file is an error, never padded


# ---------------------------------------------------------------- reading images

def load_rgb(path) -> Image.Image:
    """Any image file as 8-bit RGB: grayscale is replicated, alpha is composited on black,
    16-bit and float images are stretched from their own min..max to 0..255.

    An unreadable file (corrupt, truncated, not an image) raises a one-line UserError that names it;
    the error's `path` and `reason` attributes hold the file and the reason alone."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = _read_error_reason(e)
        err = UserError(f"cannot read image {path}: {reason} (--skip-bad-images leaves unreadable images out)")
        err.path, err.reason = str(path), reason
        raise err from None


def _read_error_reason(e: Exception) -> str:
    """Why PIL could not read a file, in one line and without repeating the path."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image (unknown or damaged format)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(str(e).split())
    return text or type(e).__name__


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGB",):
        return im.copy()
    if im.mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    if im.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    # 16-bit integer ("I;16", "I;16B", "I") and float ("F") single-channel images
    a = np.asarray(im, dtype=np.float64)
    if a.ndim == 3:
        a = a[..., :3]
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    a = a.round().astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return Image.fromarray(a, "RGB")


def array_to_rgb(a: np.ndarray) -> Image.Image:
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.shape[-1] == 1:
        return Image.fromarray(a[..., 0], "L").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB")
