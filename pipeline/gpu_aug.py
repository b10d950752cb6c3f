"""Augmentation on the device: the paper's CASS view and DINO's multi-crop applied to whole uint8
batches with torch ops, so the data loader only reads uint8 images (from the decoded-image cache)
and the CPU never runs PIL or ToTensor.

Every image carries a fixed number of uniform random numbers drawn from its own seed
(loading.item_seed(epoch seed, row), in the loader's worker, `UInt8Dataset`); on the device they
become per-sample parameters with the same distributions as the torchvision transforms of the CPU
path (`cass_params`, `dino_crop_params`), then the transforms run batched:

- CASS (transforms.cass_augment): Resize((s, s)) (bilinear, antialiased; a no-op on a cache of size s);
  RandomApply([ColorJitter(0.2, 0.2, 0.2), RandomPerspective(0.2) (its own p=0.5)], p=0.3);
  RandomApply([ColorJitter(0.2, 0.2, 0.2), RandomAffine(10)], p=0.3); vertical and horizontal flips
  p=0.3; optional blur and solarisation (Table 9); normalisation. ColorJitter applies brightness,
  contrast and saturation in a per-sample random order, as torchvision does; the perspective warp is
  torchvision's (same corner distribution, same 8-coefficient homography, bilinear, black fill) and
  the rotation too (nearest, black fill), via grid_sample.
- DINO (dino_crops.DinoMultiCrop): RandomResizedCrop (torchvision's 10-attempt sampling and fallback,
  scale and log-ratio ranges), resampled with roi_align (bilinear, averaged over ceil(crop/out)
  samples per output pixel, which antialiases like PIL's bicubic filter does, not identically),
  flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 in random order, grayscale 0.2, Gaussian blur
  (sigma = PIL's radius, U(0.1, 2); p 1.0 / 0.1 / 0.5), solarisation 0.2 on the second global crop.

Same distributions, not the same pixels: PIL rounds to uint8 after every step and filters slightly
differently; the tests compare the parameter distributions of both paths and check that the device
path with every probability set to 0 is exactly resize + normalise.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.seeds import item_seed
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (PIL's L: 0.299, 0.587, 0.114)


def uniforms(seed: int, k: int) -> torch.Tensor:
    """k uniform numbers in [0, 1) from one image's seed (float64, CPU)."""
    return torch.rand(k, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


def _randint(u, lo, hi):
    """torch.randint(lo, hi) from uniforms: lo + floor(u * (hi - lo)), in [lo, hi - 1]."""
    return (lo + torch.floor(u * (hi - lo))).clamp(max=hi - 1)


def _order(u4):
    """A uniform random permutation of 0..3 per row (torch.randperm(4)) from 4 uniforms."""
    return torch.argsort(u4, dim=-1)


# ---------------------------------------------------------------- pixel operations (float, 0..1)

def _bcast(v, x):
    return v.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _gray(x):
    return (GRAY[0] * x[:, 0:1] + GRAY[1] * x[:, 1:2] + GRAY[2] * x[:, 2:3])


def adjust_brightness(x, f):
    return (x * _bcast(f, x)).clamp_(0, 1)


def adjust_contrast(x, f):
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _bcast(f, x)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x, f):
    f = _bcast(f, x)
    return (f * x + (1 - f) * _gray(x)).clamp_(0, 1)


def _rgb2hsv(x):
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv2rgb(x):
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = i.unsqueeze(1) == torch.arange(6, device=i.device).view(1, -1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), 1)
    a2 = torch.stack((t, v, v, q, p, p), 1)
    a3 = torch.stack((p, p, t, v, v, q), 1)
    a4 = torch.stack((a1, a2, a3), 1)  # B, 3, 6, H, W
    return torch.einsum("...ijk,...xijk->...xjk", mask.to(x.dtype), a4)


def adjust_hue(x, f):
    hsv = _rgb2hsv(x)
    h = torch.remainder(hsv[:, 0] + f.to(x.dtype).view(-1, 1, 1), 1.0)
    return _hsv2rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1)).clamp_(0, 1)


def color_jitter(x, order, b, c, s, h=None):
    """torchvision ColorJitter with per-sample factors and a per-sample order of the operations
    (order: B x 4 permutations of 0..3 = brightness, contrast, saturation, hue; hue None skips it)."""
    for k in range(4):
        op = order[:, k].view(-1, 1, 1, 1)
        y = torch.where(op == 0, adjust_brightness(x, b), x)
        y = torch.where(op == 1, adjust_contrast(x, c), y)
        y = torch.where(op == 2, adjust_saturation(x, s), y)
        if h is not None:
            y = torch.where(op == 3, adjust_hue(x, h), y)
        x = y
    return x


def _base_grid(h, w, centered, dtype, device):
    d = 0.5
    if centered:
        xs = torch.linspace(-w * 0.5 + d, w * 0.5 + d - 1, w, dtype=dtype, device=device)
        ys = torch.linspace(-h * 0.5 + d, h * 0.5 + d - 1, h, dtype=dtype, device=device)
    else:
        xs = torch.linspace(d, w + d - 1.0, w, dtype=dtype, device=device)
        ys = torch.linspace(d, h + d - 1.0, h, dtype=dtype, device=device)
    g = torch.stack(torch.broadcast_tensors(xs.view(1, -1), ys.view(-1, 1)) + (torch.ones(h, w, dtype=dtype, device=device),), -1)
    return g.view(1, h * w, 3)


def perspective_coeffs(startpoints, endpoints):
    """torchvision's _get_perspective_coeffs, batched: (B, 4, 2) corners -> (B, 8) coefficients of the
    homography mapping output pixels to input pixels (float64 solve)."""
    sp, ep = startpoints.double(), endpoints.double()
    B = ep.shape[0]
    A = torch.zeros(B, 8, 8, dtype=torch.float64, device=ep.device)
    x, y = ep[..., 0], ep[..., 1]
    X, Y = sp[..., 0], sp[..., 1]
    A[:, 0::2, 0], A[:, 0::2, 1], A[:, 0::2, 2] = x, y, 1
    A[:, 0::2, 6], A[:, 0::2, 7] = -X * x, -X * y
    A[:, 1::2, 3], A[:, 1::2, 4], A[:, 1::2, 5] = x, y, 1
    A[:, 1::2, 6], A[:, 1::2, 7] = -Y * x, -Y * y
    b = sp.reshape(B, 8)
    return torch.linalg.solve_ex(A, b)[0]  # solve_ex: no error check, so no host sync on CUDA


def perspective(x, coeffs):
    """torchvision's tensor perspective (its _perspective_grid) with per-sample coefficients,
    bilinear, zero (black) fill."""
    B, _, h, w = x.shape
    c = coeffs.to(torch.float32)
    theta1 = torch.stack([c[:, 0:3] / (0.5 * w), c[:, 3:6] / (0.5 * h)], 1)  # B, 2, 3, rescaled
    ones = torch.ones(B, 1, dtype=c.dtype, device=c.device)
    theta2 = torch.cat([c[:, 6:8], ones], 1).unsqueeze(1).expand(B, 2, 3)
    base = _base_grid(h, w, False, torch.float32, x.device).expand(B, -1, -1)
    g1 = base.bmm(theta1.transpose(1, 2))
    g2 = base.bmm(theta2.transpose(1, 2))
    grid = (g1 / g2 - 1.0).view(B, h, w, 2)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate(x, angle_deg, mode="nearest"):
    """torchvision's tensor affine for a rotation about the centre (RandomAffine(degrees) with no
    translation, scale or shear), per-sample angle, black fill."""
    B, _, h, w = x.shape
    rot = torch.deg2rad(angle_deg.to(torch.float32))
    cos, sin = torch.cos(rot), torch.sin(rot)
    zero = torch.zeros_like(cos)
    # _get_inverse_affine_matrix([0, 0], angle, (0, 0), 1, (0, 0)) = [d, -b, 0, -c, a, 0]
    theta = torch.stack([torch.stack([cos, sin, zero], -1) / (0.5 * w), torch.stack([-sin, cos, zero], -1) / (0.5 * h)], 1)
    base = _base_grid(h, w, True, torch.float32, x.device).expand(B, -1, -1)
    grid = base.bmm(theta.transpose(1, 2)).view(B, h, w, 2)
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="zeros", align_corners=False)


def gaussian_blur(x, sigma, k: int):
    """Separable Gaussian blur, kernel size k, per-sample sigma, reflect padding (torchvision's)."""
    B, C, h, w = x.shape
    half = (k - 1) * 0.5
    t = torch.linspace(-half, half, k, dtype=x.dtype, device=x.device)
    ker = torch.exp(-0.5 * (t.view(1, -1) / sigma.to(x.dtype).view(-1, 1)) ** 2)
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(C, 0)  # B*C, k
    p = k // 2
    y = F.pad(x.reshape(1, B * C, h, w), (p, p, p, p), mode="reflect")
    y = F.conv2d(y, ker.view(B * C, 1, 1, k), groups=B * C)
    y = F.conv2d(y, ker.view(B * C, 1, k, 1), groups=B * C)
    return y.view(B, C, h, w)


def _where(mask, a, b):
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def to_float(imgs: torch.Tensor) -> torch.Tensor:
    """uint8 images as stored, (B, H, W) or (B, H, W, C) with C in 1, 3, 4 -> float (B, 3, H, W) in
    [0, 1] (grayscale repeated, alpha dropped), a channels-last view of the input's memory."""
    if imgs.dim() == 3:
        imgs = imgs.unsqueeze(-1)
    x = imgs.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    return x.float().div_(255)


def resize(x, size: int):
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


class Normalize:
    """The evaluation transform on the device: uint8 -> Resize((s, s)) -> float -> normalise."""

    n_uniforms = 0

    def __init__(self, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.mean, self.std = size, mean, std
        self._consts = {}

    def normalize(self, x):
        key = (x.device, x.dtype)
        if key not in self._consts:  # copied to the device once (a copy from the host may synchronise)
            self._consts[key] = tuple(torch.tensor(v, dtype=x.dtype).view(1, 3, 1, 1).to(x.device)
                                      for v in (self.mean, self.std))
        mean, std = self._consts[key]
        return (x - mean) / std

    def __call__(self, imgs, u=None):
        return self.normalize(resize(to_float(imgs), self.size))


# ---------------------------------------------------------------- CASS

# positions in each image's uniform vector
_C = dict(apply1=0, order1=slice(1, 5), f1=slice(5, 8), persp=8, corners=slice(9, 17), apply2=17,
          order2=slice(18, 22), f2=slice(22, 25), angle=25, vflip=26, hflip=27, blur=28, sigma=29, solar=30)
CASS_UNIFORMS = 31


def cass_params(u: torch.Tensor, h: int, w: int, probs=None) -> dict:
    """Per-sample parameters of the CASS chain from uniforms u (B, 31) for h x w images.

    probs overrides the application probabilities (keys apply1, persp, apply2, vflip, hflip, blur,
    solar); the tests set them all to 0 (identity) or 1."""
    p = dict(apply1=0.3, persp=0.5, apply2=0.3, vflip=0.3, hflip=0.3, blur=0.5, solar=0.2)
    p.update(probs or {})
    dw, dh = int(0.2 * (w // 2)), int(0.2 * (h // 2))
    cu = u[:, _C["corners"]]
    corners = torch.stack([
        _randint(cu[:, 0], 0, dw + 1), _randint(cu[:, 1], 0, dh + 1),                      # top-left
        _randint(cu[:, 2], w - dw - 1, w), _randint(cu[:, 3], 0, dh + 1),                  # top-right
        _randint(cu[:, 4], w - dw - 1, w), _randint(cu[:, 5], h - dh - 1, h),              # bottom-right
        _randint(cu[:, 6], 0, dw + 1), _randint(cu[:, 7], h - dh - 1, h)], 1).view(-1, 4, 2)  # bottom-left
    apply1 = u[:, _C["apply1"]] < p["apply1"]
    return {
        "apply1": apply1, "order1": _order(u[:, _C["order1"]]), "f1": 0.8 + 0.4 * u[:, _C["f1"]],
        "persp": apply1 & (u[:, _C["persp"]] < p["persp"]), "endpoints": corners,
        "apply2": u[:, _C["apply2"]] < p["apply2"], "order2": _order(u[:, _C["order2"]]),
        "f2": 0.8 + 0.4 * u[:, _C["f2"]], "angle": -10.0 + 20.0 * u[:, _C["angle"]],
        "vflip": u[:, _C["vflip"]] < p["vflip"], "hflip": u[:, _C["hflip"]] < p["hflip"],
        "blur": u[:, _C["blur"]] < p["blur"], "sigma": 0.1 + 1.9 * u[:, _C["sigma"]],
        "solar": u[:, _C["solar"]] < p["solar"]}


class CassGpuAugment(Normalize):
    """transforms.cass_augment(size, extra) on a batch: __call__(uint8 images, uniforms (B, 31))
    -> float (B, 3, size, size), normalised."""

    n_uniforms = CASS_UNIFORMS

    def __init__(self, size: int, extra=(), mean=IMAGENET_MEAN, std=IMAGENET_STD, probs=None):
        super().__init__(size, mean, std)
        self.extra, self.probs = tuple(extra), probs or {}

    def __call__(self, imgs, u):
        x = resize(to_float(imgs), self.size)
        B, _, h, w = x.shape
        P = cass_params(u.to(x.device), h, w, self.probs)
        # RandomApply([ColorJitter, RandomPerspective(p=0.5)], p=0.3)
        f = P["f1"].to(x.dtype)
        x = _where(P["apply1"], color_jitter(x, P["order1"], f[:, 0], f[:, 1], f[:, 2]), x)
        start = torch.zeros(B, 4, 2, dtype=torch.float64, device=x.device)  # [[0, 0], [w-1, 0], [w-1, h-1], [0, h-1]]
        start[:, 1:3, 0] = w - 1
        start[:, 2:4, 1] = h - 1
        x = _where(P["persp"], perspective(x, perspective_coeffs(start, P["endpoints"])), x)
        # RandomApply([ColorJitter, RandomAffine(10)], p=0.3)
        f = P["f2"].to(x.dtype)
        y = rotate(color_jitter(x, P["order2"], f[:, 0], f[:, 1], f[:, 2]), P["angle"])
        x = _where(P["apply2"], y, x)
        x = _where(P["vflip"], x.flip(-2), x)
        x = _where(P["hflip"], x.flip(-1), x)
        if "blur" in self.extra:
            k = max(3, int(0.1 * self.size) // 2 * 2 + 1)
            x = _where(P["blur"], gaussian_blur(x, P["sigma"], k), x)
        if "solarize" in self.extra:
            x = _where(P["solar"], torch.where(x >= 128 / 255, 1.0 - x, x), x)
        return self.normalize(x)


# ---------------------------------------------------------------- DINO multi-crop

_D = dict(rrc=slice(0, 40), flip=40, jitter=41, order=slice(42, 46), b=46, c=47, s=48, h=49, gray=50,
          blur=51, radius=52, solar=53)
DINO_UNIFORMS_PER_CROP = 54
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def rrc_boxes(u40: torch.Tensor, h, w, scale) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params, batched: 10 attempts of (area, log-ratio, top, left)
    from u40 (N, 40); the first valid one, else the central fallback. h, w: the image size, as ints
    or as (N,) tensors (one source size per crop). Returns (N, 4) = top, left, height, width
    (integers, float64)."""
    u = u40.view(-1, 10, 4)
    h, w = (torch.as_tensor(v, dtype=u.dtype, device=u.device).reshape(-1, 1) for v in (h, w))
    area = h * w
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    ratio = torch.exp(LOG_RATIO[0] + (LOG_RATIO[1] - LOG_RATIO[0]) * u[..., 1])
    cw = torch.round(torch.sqrt(target * ratio))
    ch = torch.round(torch.sqrt(target / ratio))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    ci = torch.floor(u[..., 2] * (h - ch + 1))
    cj = torch.floor(u[..., 3] * (w - cw + 1))
    first = ok.to(torch.int64).argmax(1, keepdim=True)
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    top, left, hh, ww = pick(ci), pick(cj), pick(ch), pick(cw)
    # fallback: the whole image, or a central crop of the extreme ratio
    h, w = h.squeeze(1), w.squeeze(1)
    in_ratio = w / h
    fw = torch.where(in_ratio > 4 / 3, torch.round(h * (4 / 3)), w)
    fh = torch.where(in_ratio < 3 / 4, torch.round(w / (3 / 4)), h)
    any_ok = ok.any(1)
    fb = (torch.div(h - fh, 2, rounding_mode="floor"), torch.div(w - fw, 2, rounding_mode="floor"), fh, fw)
    return torch.stack([torch.where(any_ok, t, f) for t, f in zip((top, left, hh, ww), fb)], 1)


def dino_crop_params(u: torch.Tensor, h: int, w: int, scale, blur_p, solar_p) -> dict:
    """Per-crop parameters of one kind of DINO crop from uniforms (N, 54)."""
    return {
        "box": rrc_boxes(u[:, _D["rrc"]], h, w, scale), "flip": u[:, _D["flip"]] < 0.5,
        "jitter": u[:, _D["jitter"]] < 0.8, "order": _order(u[:, _D["order"]]),
        "b": 0.6 + 0.8 * u[:, _D["b"]], "c": 0.6 + 0.8 * u[:, _D["c"]], "s": 0.8 + 0.4 * u[:, _D["s"]],
        "h": -0.1 + 0.2 * u[:, _D["h"]], "gray": u[:, _D["gray"]] < 0.2,
        # PILGaussianBlur: blurred unless random() > p; PILSolarize: random() < p
        "blur": u[:, _D["blur"]] <= blur_p, "radius": 0.1 + 1.9 * u[:, _D["radius"]],
        "solar": u[:, _D["solar"]] < solar_p}


class DinoGpuMultiCrop(Normalize):
    """dino_crops.DinoMultiCrop on a batch: __call__(uint8 images (B, H, W, 3), uniforms (B, (2 + n_local)
    * 54), then optionally each image's source (height, width)) -> list of 2 + n_local float tensors
    (B, 3, size, size), crop-major like the CPU path's collated lists (global 1, global 2, local 1, ...).
    With source sizes (the decoded cache's, see UInt8Dataset) the crop boxes are drawn in the source
    geometry and mapped onto the stretched square, as dino_crops.SourceCrop does."""

    wants_source_size = True

    def __init__(self, global_size=224, local_size=96, n_local=8, global_scale=(0.4, 1.0),
                 local_scale=(0.05, 0.4), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(global_size, mean, std)
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.n_uniforms = (2 + n_local) * DINO_UNIFORMS_PER_CROP

    def _kind(self, x, u, src, crops, size, scale, blur_p, solar_p):
        from torchvision.ops import roi_align
        B, _, h, w = x.shape
        k = DINO_UNIFORMS_PER_CROP
        uu = torch.cat([u[:, c * k:(c + 1) * k] for c in crops])  # crop-major
        n = len(crops)
        full = lambda ps: torch.cat([torch.full((B,), float(p), dtype=uu.dtype, device=uu.device) for p in ps])  # noqa: E731
        h0, w0 = (src[:, 0].repeat(n), src[:, 1].repeat(n)) if src is not None else (h, w)
        P = dino_crop_params(uu, h0, w0, scale, full(blur_p), full(solar_p))
        top, left, ch, cw = P["box"].unbind(1)
        if src is not None:  # the box drawn on the source, onto the stretched square
            top, ch, left, cw = top * (h / h0), ch * (h / h0), left * (w / w0), cw * (w / w0)
        idx = torch.arange(B, device=x.device, dtype=torch.float64).repeat(n)
        boxes = torch.stack([idx, left, top, left + cw, top + ch], 1).to(x.dtype)
        y = roi_align(x, boxes, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True).clamp_(0, 1)
        y = _where(P["flip"].to(y.device), y.flip(-1), y)
        dt = y.dtype
        jit = color_jitter(y, P["order"].to(y.device), P["b"].to(y.device, dt), P["c"].to(y.device, dt),
                           P["s"].to(y.device, dt), P["h"].to(y.device, dt))
        y = _where(P["jitter"].to(y.device), jit, y)
        y = _where(P["gray"].to(y.device), _gray(y).expand(-1, 3, -1, -1), y)
        if bool(np.any(np.asarray(blur_p) > 0)):
            y = _where(P["blur"].to(y.device), gaussian_blur(y, P["radius"].to(y.device), 13), y)
        if bool(np.any(np.asarray(solar_p) > 0)):
            y = _where(P["solar"].to(y.device), torch.where(y >= 128 / 255, 1.0 - y, y), y)
        return list(self.normalize(y).split(B))

    def __call__(self, imgs, u):
        x = to_float(imgs)
        u = u.to(x.device)
        src = u[:, self.n_uniforms:] if u.shape[1] == self.n_uniforms + 2 else None
        out = self._kind(x, u, src, [0, 1], self.global_size, self.global_scale, [1.0, 0.1], [0.0, 0.2])
        if self.n_local:
            out += self._kind(x, u, src, list(range(2, 2 + self.n_local)), self.local_size, self.local_scale,
                              [0.5] * self.n_local, [0.0] * self.n_local)
        return out


# ---------------------------------------------------------------- the loader side

class UInt8Dataset(torch.utils.data.Dataset):
    """Rows of an array-backed table (the decoded cache, synthetic, medmnist) as
    ((uint8 H x W x C tensor, k uniforms), label, row): no decoding, no ToTensor. With EpochSampler's
    (epoch_seed, i) keys the uniforms come from loading.item_seed(epoch_seed, row). For a transform
    with wants_source_size (DINO's crops) and a decoded cache, the row's source (height, width)
    follows the k uniforms."""

    def __init__(self, table, rows, device_transform):
        if table.array is None:
            raise ValueError("UInt8Dataset needs images held in an array (the decoded cache)")
        self.table, self.rows = table, np.asarray(rows, dtype=np.int64)
        if isinstance(device_transform, int):  # only the number of uniforms (tests, benchmarks)
            self.device_transform, self.k = None, device_transform
        else:  # what batch_to_device applies to this dataset's batches
            self.device_transform, self.k = device_transform, device_transform.n_uniforms
        wants = getattr(self.device_transform, "wants_source_size", False)
        self.source_sizes = table.extra.get("source_sizes") if wants else None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        epoch_seed, i = key if isinstance(key, tuple) else (None, key)
        row = int(self.rows[i])
        img = torch.from_numpy(np.array(self.table.array[row], dtype=np.uint8))  # a writable copy
        if self.k == 0:
            u = torch.zeros(0, dtype=torch.float64)
        elif epoch_seed is None:
            u = torch.rand(self.k, dtype=torch.float64)
        else:
            u = uniforms(item_seed(epoch_seed, row), self.k)
        if self.source_sizes is not None:
            u = torch.cat([u, torch.as_tensor(self.source_sizes[row], dtype=torch.float64)])
        return (img, u), torch.as_tensor(self.table.labels[row]), row
