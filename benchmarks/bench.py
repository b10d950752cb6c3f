"""Throughput and memory of every part of the pipeline, one JSON line per measurement on stdout.

    python -m benchmarks.bench                                 # CPU: resnet18 + vit_tiny_patch16_224 at 64 px
    python -m benchmarks.bench --device cuda                   # CUDA: resnet50 + vit_base_patch16_384 at 384 px, bs 16
    python -m benchmarks.bench --only data_jpeg,data_cache --workers 0
    python -m benchmarks.bench --device cuda --bs 64 --only cass_step

Measurements (--only takes a comma-separated list of these names):
  cass_step          one CASS iteration (pretrain_cass.cass_step) on a device-resident batch
  dino_step_cnn      one DINO iteration of --cnn with its multi-crop (pretrain_dino.train_step):
  dino_step_vit      2 global crops of --img-size px + --local-crops of --local-size px, same batch
  cass_vs_dino       the ratios of the three above (DINO time per step / CASS time per step); the
                     same data and batch give the same number of steps per epoch, so the per-step
                     ratio is the per-epoch ratio (Table 2 compares one CASS run with two DINO runs)
  finetune_step_cnn  one fine-tuning iteration (finetune.finetune_step, focal loss, Adam)
  finetune_step_vit
  cache_build        decoding + resizing synthetic JPEGs of ISIC's sizes into the decoded cache
  data_jpeg          the CPU loader pipeline from JPEG files: decode + Resize + the CASS augmentations
  data_cache         the same from the decoded cache (Resize is then a no-op)
  data_uint8         the --gpu-aug loader: uint8 images from the cache + per-image random numbers
  gpu_aug_cass       the CASS augmentations of pipeline/gpu_aug.py on a batch already on the device
  gpu_aug_dino       DINO's multi-crop of pipeline/gpu_aug.py on a batch already on the device
  cass_e2e           CASS training end to end: loader from the decoded cache (pinned, --workers),
  dino_e2e_cnn       augmentation (on the device with CUDA, else the CPU transforms), the step
  dino_e2e_vit

The data measurements use --n-images synthetic JPEGs (half 1024 x 1024, half 600 x 450, like
ISIC 2019) written to a temporary folder, at --data-size px (default 384, the paper's size), and
report images/s and images/s per worker (--workers 0: the main process is the one worker).
Step measurements run --warmup steps first, then time --steps (torch.cuda.synchronize around them
on CUDA). On CUDA the peak memory statistics are reset after the warm-up (compilation, autotuning and
cuDNN's benchmark runs happen there, once per run), so they cover the timed steps: peak_mem_mb is
torch.cuda.max_memory_allocated (what the tensors took), peak_reserved_mb max_memory_reserved (what
the process held in PyTorch's caching allocator, warm-up's cached blocks included: what has to fit in
the GPU). On the CPU peak_mem_mb is the process's peak resident memory so far (ru_maxrss, monotonic
over the run: an upper bound) and peak_reserved_mb is null.
Random initialisation always (no download). A failed measurement (e.g. out of memory) prints a line
with "error" and the others go on.
"""

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEP_NAMES = ["cass_step", "dino_step_cnn", "dino_step_vit", "cass_vs_dino", "finetune_step_cnn",
              "finetune_step_vit"]
DATA_NAMES = ["cache_build", "data_jpeg", "data_cache", "data_uint8"]
DEVICE_NAMES = ["gpu_aug_cass", "gpu_aug_dino", "cass_e2e", "dino_e2e_cnn", "dino_e2e_vit"]
ALL_NAMES = STEP_NAMES + DATA_NAMES + DEVICE_NAMES


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--only", default="", help="comma-separated measurement names (default: all)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--bs", type=int, default=16, help="batch size (the paper's: 16)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default 384 on CUDA, 64 on CPU)")
    p.add_argument("--cnn", default=None, help="default resnet50 on CUDA, resnet18 on CPU")
    p.add_argument("--vit", default=None, help="default vit_base_patch16_384 on CUDA, vit_tiny_patch16_224 on CPU")
    p.add_argument("--local-crops", type=int, default=8, help="DINO local crops (official: 8)")
    p.add_argument("--local-size", type=int, default=None,
                   help="DINO local crop size (default 96, the official size, from 224 px up; half --img-size "
                        "rounded to 16 below)")
    p.add_argument("--out-dim", type=int, default=65536, help="DINO head output dimension (official: 65536)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers of the data and end-to-end measurements (default: 0 on CPU, "
                        "min(8, cores) on CUDA)")
    p.add_argument("--data-size", type=int, default=384, help="image size of the data-pipeline measurements")
    p.add_argument("--n-images", type=int, default=None,
                   help="synthetic JPEGs for the data measurements (default 48 on CPU, 256 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models of the step measurements")
    p.add_argument("--gpu-aug", action=argparse.BooleanOptionalAction, default=None,
                   help="end-to-end measurements with the augmentation of pipeline/gpu_aug.py (default: on CUDA only; "
                        "--gpu-aug on the CPU runs the same code on CPU tensors)")
    p.add_argument("--tmp", default=None, help="folder for the synthetic JPEGs and their cache (default: a temp dir)")
    args = p.parse_args(argv)
    from runtime.cli import pick_device
    args.device = pick_device(args.device)
    cuda = args.device.type == "cuda"
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.img_size = args.img_size or (384 if cuda else 64)
    args.cnn = args.cnn or ("resnet50" if cuda else "resnet18")
    args.vit = args.vit or ("vit_base_patch16_384" if cuda else "vit_tiny_patch16_224")
    if args.local_size is None:
        args.local_size = 96 if args.img_size >= 224 else max(16, round(args.img_size / 2 / 16) * 16)
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1) if cuda else 0
    args.n_images = args.n_images or (256 if cuda else 48)
    names = [n for n in args.only.split(",") if n] or ALL_NAMES
    unknown = set(names) - set(ALL_NAMES)
    if unknown:
        p.error(f"--only: unknown measurement(s) {sorted(unknown)}; choose from {', '.join(ALL_NAMES)}")
    args.names = names
    return args


# ---------------------------------------------------------------- helpers

def emit(rec: dict):
    print(json.dumps(rec, sort_keys=False), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device, children=False):
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
        return round(r / 1024, 1)  # Linux: KiB
    except (AttributeError, ValueError, OSError):
        return None


def peak_memory(device, children=False) -> dict:
    """peak_mem_mb and peak_reserved_mb (see the module's docstring)."""
    reserved = round(torch.cuda.max_memory_reserved(device) / 2**20, 1) if device.type == "cuda" else None
    return {"peak_mem_mb": peak_mb(device, children), "peak_reserved_mb": reserved}


def timed(step, device, warmup, steps):
    """Seconds per call of step() after `warmup` calls (synchronised on CUDA). The peak memory
    statistics are reset after the warm-up: they are those of the timed steps."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def base(args, name, **settings):
    return {"name": name, "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), **settings}


def normal_batch(args, size, bs=None):
    return torch.randn(bs or args.bs, 3, size, size, device=args.device)


# ---------------------------------------------------------------- model steps

def cass_models(args):
    from losses import CASSLoss
    from models import create_backbone, uses_channels_last
    from pretrain_cass import make_optimizer
    torch.manual_seed(0)
    cnn = create_backbone(args.cnn, "random", img_size=args.img_size).to(args.device)
    vit = create_backbone(args.vit, "random", img_size=args.img_size).to(args.device)
    for m in (cnn, vit):
        if uses_channels_last(m, args.device):
            m.to(memory_format=torch.channels_last)
    opt_c = make_optimizer("adam", cnn.parameters(), 1e-3, args.device)
    opt_v = make_optimizer("adam", vit.parameters(), 1e-3, args.device)
    fc, fv = (torch.compile(cnn), torch.compile(vit)) if args.compile else (cnn, vit)
    return cnn, vit, fc, fv, opt_c, opt_v, CASSLoss()


def bench_cass_step(args):
    from pretrain_cass import cass_step
    reset_peak(args.device)
    cnn, vit, fc, fv, oc, ov, crit = cass_models(args)
    x = normal_batch(args, args.img_size)
    s = timed(lambda: cass_step(x, fc, fv, crit, oc, ov, args.device), args.device, args.warmup, args.steps)
    rec = base(args, "cass_step", cnn=args.cnn, vit=args.vit, bs=args.bs, img_size=args.img_size,
               compile=args.compile, steps=args.steps, s_per_step=round(s, 5), img_per_s=round(args.bs / s, 2),
               isic_epoch_s=round(17700 / (args.bs / s), 1), **peak_memory(args.device))
    return rec


def dino_setup(args, arch):
    import pretrain_dino as PD
    from losses import DINOLoss
    dargs = PD.get_args(["--arch", arch, "--init", "random", "--img-size", str(args.img_size), "--local-size",
                         str(args.local_size), "--local-crops", str(args.local_crops), "--out-dim",
                         str(args.out_dim), "--bs", str(args.bs), "--out", os.devnull])
    torch.manual_seed(0)
    student, teacher, _ = PD.build_models(dargs, args.device)
    if args.device.type == "cuda" and PD.is_cnn_input(student):
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
    loss = DINOLoss(dargs.out_dim, 2 + dargs.local_crops).to(args.device)
    opt = PD.make_optimizer(dargs.optimizer, PD.param_groups(student), args.device)
    if args.compile:
        student.compile_backbone(), teacher.compile_backbone()

    def step(crops):
        return PD.train_step(crops, student, teacher, loss, opt, epoch=1, lr=1e-5, wd=0.04, momentum=0.996,
                             clip_grad=3.0, freeze_last_layer=1, device=args.device)
    return dargs, step


def bench_dino_step(args, kind):
    arch = args.cnn if kind == "cnn" else args.vit
    reset_peak(args.device)
    dargs, step = dino_setup(args, arch)
    crops = [normal_batch(args, args.img_size) for _ in range(2)] + \
            [normal_batch(args, args.local_size) for _ in range(args.local_crops)]
    s = timed(lambda: step(crops), args.device, args.warmup, args.steps)
    return base(args, f"dino_step_{kind}", arch=arch, bs=args.bs, img_size=args.img_size, global_crops=2,
                local_crops=args.local_crops, local_size=args.local_size, out_dim=args.out_dim, compile=args.compile,
                steps=args.steps, s_per_step=round(s, 5), img_per_s=round(args.bs / s, 2),
                isic_epoch_s=round(17700 / (args.bs / s), 1), **peak_memory(args.device))


def bench_finetune_step(args, kind):
    from finetune import finetune_step
    from losses import FocalLoss
    from models import create_backbone, uses_channels_last
    arch = args.cnn if kind == "cnn" else args.vit
    reset_peak(args.device)
    torch.manual_seed(0)
    model = create_backbone(arch, "random", num_classes=8, img_size=args.img_size).to(args.device)
    if uses_channels_last(model, args.device):
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, fused=args.device.type == "cuda")
    fwd = torch.compile(model) if args.compile else model
    crit = FocalLoss(weight=torch.ones(8)).to(args.device)
    x = normal_batch(args, args.img_size)
    y = torch.randint(0, 8, (args.bs,), device=args.device)
    model.train()
    s = timed(lambda: finetune_step(fwd, x, y, crit, opt, args.device), args.device, args.warmup, args.steps)
    return base(args, f"finetune_step_{kind}", arch=arch, bs=args.bs, img_size=args.img_size, compile=args.compile,
                steps=args.steps, s_per_step=round(s, 5), img_per_s=round(args.bs / s, 2),
                **peak_memory(args.device))


# ---------------------------------------------------------------- data

def make_jpegs(folder: Path, n: int, seed: int = 0):
    """n textured JPEGs, half 1024 x 1024 and half 600 x 450 (ISIC 2019's sizes), in two class
    folders (the 'folder' layout). Smooth colour fields plus noise, quality 90: roughly the bytes
    per pixel of dermoscopy photographs."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (1024, 1024) if i % 2 == 0 else (600, 450)
        low = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        a = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
        d = folder / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(d / f"img{i:04d}.jpg", quality=90)


def data_table(args, tmp: Path):
    from datasets import load_table
    root = tmp / "jpegs"
    if not root.is_dir() or len(list(root.rglob("*.jpg"))) != args.n_images:
        t0 = time.perf_counter()
        make_jpegs(root, args.n_images)
        print(f"bench: wrote {args.n_images} synthetic JPEGs in {time.perf_counter() - t0:.1f}s to {root}",
              file=sys.stderr)
    return load_table("folder", root)


def loader_rate(ds, bs, workers, device, min_images):
    """Images/s of iterating a loader over ds (first batch excluded: worker start-up)."""
    from pipeline.loading import make_loader
    loader = make_loader(ds, bs, shuffle=True, workers=workers, device=device,
                         generator=torch.Generator().manual_seed(1))
    n, t0, first = 0, None, True
    while n < min_images:
        for x, _, _ in loader:
            if first:
                first, t0 = False, time.perf_counter()
                continue
            n += bs
            if n >= min_images:
                break
        loader.sampler.set_epoch_seed(n)
    return n / (time.perf_counter() - t0)


def bench_data(args, name, tmp):
    from pipeline.decoded_cache import cached_table
    from pipeline.gpu_aug import CASS_UNIFORMS, UInt8Dataset
    from pipeline.loading import ImageDataset
    from pipeline.transforms import cass_augment
    S = args.data_size
    table = data_table(args, tmp)
    w = args.workers
    per = max(w, 1)
    settings = dict(img_size=S, workers=w, n_images=args.n_images, sources="50% 1024x1024, 50% 600x450 JPEG")
    if name == "cache_build":
        for f in (tmp / "cache" / "decoded").glob(f"folder-{S}px-*"):
            f.unlink()
        t0 = time.perf_counter()
        cached_table(table, S, tmp / "cache", workers=w, progress=False)
        rate = len(table) / (time.perf_counter() - t0)
        return base(args, name, **settings, img_per_s=round(rate, 2), img_per_s_per_worker=round(rate / per, 2),
                    peak_mem_mb=peak_mb(torch.device("cpu")))
    bs = 8
    min_images = max(2 * args.n_images, 64)
    if name == "data_jpeg":
        ds = ImageDataset(table, np.arange(len(table)), cass_augment(S))
    else:
        ct = cached_table(table, S, tmp / "cache", workers=w, progress=False)
        if name == "data_cache":
            ds = ImageDataset(ct, np.arange(len(ct)), cass_augment(S))
        else:
            ds = UInt8Dataset(ct, np.arange(len(ct)), CASS_UNIFORMS)
            min_images *= 4
    rate = loader_rate(ds, bs, w, torch.device("cpu"), min_images)
    return base(args, name, **settings, bs=bs, img_per_s=round(rate, 2), img_per_s_per_worker=round(rate / per, 2),
                peak_mem_mb=peak_mb(torch.device("cpu"), children=w > 0))


# ---------------------------------------------------------------- device-side augmentation and end to end

def bench_gpu_aug(args, kind):
    from pipeline import gpu_aug as G
    from pipeline.dino_crops import dino_cache_size
    reset_peak(args.device)
    if kind == "cass":
        aug, S = G.CassGpuAugment(args.img_size), args.img_size
    else:
        aug = G.DinoGpuMultiCrop(args.img_size, args.local_size, args.local_crops)
        S = dino_cache_size(args.img_size, args.local_size, (0.4, 1.0), (0.05, 0.4))
    imgs = torch.randint(0, 256, (args.bs, S, S, 3), dtype=torch.uint8, device=args.device)
    u = torch.stack([G.uniforms(i, aug.n_uniforms) for i in range(args.bs)]).to(args.device)
    s = timed(lambda: aug(imgs, u), args.device, args.warmup, args.steps)
    return base(args, f"gpu_aug_{kind}", bs=args.bs, img_size=args.img_size, source_size=S,
                **({"local_crops": args.local_crops, "local_size": args.local_size} if kind == "dino" else {}),
                steps=args.steps, s_per_batch=round(s, 5), img_per_s=round(args.bs / s, 2),
                **peak_memory(args.device))


def bench_e2e(args, name, tmp):
    """Training steps fed by the real loader from the decoded cache (cycled over epochs)."""
    from pipeline.decoded_cache import cached_table
    from pipeline.dino_crops import dino_cache_size
    from pipeline.loading import cass_pipeline, dino_pipeline, make_loader
    table = data_table(args, tmp)
    gpu = args.device.type == "cuda" if args.gpu_aug is None else args.gpu_aug
    reset_peak(args.device)
    if name == "cass_e2e":
        from pretrain_cass import cass_step
        S = args.img_size
        ct = cached_table(table, S, tmp / "cache", workers=args.workers, progress=False)
        ds, prepare = cass_pipeline(ct, np.arange(len(ct)), S, (), args.device, gpu)
        cnn, vit, fc, fv, oc, ov, crit = cass_models(args)
        step = lambda x: cass_step(x, fc, fv, crit, oc, ov, args.device)  # noqa: E731
        extra = dict(cnn=args.cnn, vit=args.vit)
    else:
        kind = name.rsplit("_", 1)[1]
        S = dino_cache_size(args.img_size, args.local_size, (0.4, 1.0), (0.05, 0.4))
        ct = cached_table(table, S, tmp / "cache", workers=args.workers, progress=False)
        dargs, dstep = dino_setup(args, args.cnn if kind == "cnn" else args.vit)
        ds, prepare = dino_pipeline(ct, np.arange(len(ct)), dargs, args.device, gpu)
        step = dstep
        extra = dict(arch=dargs.arch, local_crops=args.local_crops, local_size=args.local_size, out_dim=args.out_dim)
    if len(ds) < args.bs:
        raise ValueError(f"--n-images {len(ds)} is below --bs {args.bs}: no full batch to train on")
    epoch = [0]

    def batches():
        while True:
            loader = make_loader(ds, args.bs, shuffle=True, workers=args.workers, drop_last=True, device=args.device,
                                 generator=torch.Generator().manual_seed(epoch[0]))
            epoch[0] += 1
            for x, _, _ in loader:
                yield x
    it = batches()
    s = timed(lambda: step(prepare(next(it))), args.device, args.warmup, args.steps)
    return base(args, name, **extra, bs=args.bs, img_size=args.img_size, cache_size=S, workers=args.workers,
                gpu_aug=gpu, compile=args.compile, steps=args.steps, s_per_step=round(s, 5),
                img_per_s=round(args.bs / s, 2), isic_epoch_s=round(17700 / (args.bs / s), 1),
                **peak_memory(args.device))


# ---------------------------------------------------------------- main

def main(argv=None):
    args = get_args(argv)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    tmp_ctx = None
    if args.tmp:
        tmp = Path(args.tmp)
        tmp.mkdir(parents=True, exist_ok=True)
    else:
        tmp_ctx = tempfile.TemporaryDirectory(prefix="cass-bench-")
        tmp = Path(tmp_ctx.name)
    results = {}
    try:
        for name in args.names:
            t0 = time.perf_counter()
            try:
                if name == "cass_step":
                    rec = bench_cass_step(args)
                elif name.startswith("dino_step_"):
                    rec = bench_dino_step(args, name.rsplit("_", 1)[1])
                elif name.startswith("finetune_step_"):
                    rec = bench_finetune_step(args, name.rsplit("_", 1)[1])
                elif name == "cass_vs_dino":
                    need = ("cass_step", "dino_step_cnn", "dino_step_vit")
                    if not all(n in results and "s_per_step" in results[n] for n in need):
                        raise RuntimeError("needs cass_step, dino_step_cnn and dino_step_vit in the same run")
                    c, dc, dv = (results[n]["s_per_step"] for n in need)
                    rec = base(args, name, cnn=args.cnn, vit=args.vit, bs=args.bs, img_size=args.img_size,
                               local_crops=args.local_crops, local_size=args.local_size, out_dim=args.out_dim,
                               cass_s_per_step=c, dino_cnn_s_per_step=dc, dino_vit_s_per_step=dv,
                               dino_cnn_over_cass=round(dc / c, 3), dino_vit_over_cass=round(dv / c, 3),
                               dino_both_over_cass=round((dc + dv) / c, 3),
                               img_per_s=results["cass_step"]["img_per_s"], peak_mem_mb=None)
                elif name in DATA_NAMES:
                    rec = bench_data(args, name, tmp)
                elif name.startswith("gpu_aug_"):
                    rec = bench_gpu_aug(args, name.rsplit("_", 1)[1])
                else:
                    rec = bench_e2e(args, name, tmp)
            except Exception as e:  # noqa: BLE001  (an out-of-memory or a missing piece: report, go on)
                rec = base(args, name, bs=args.bs, img_size=args.img_size, error=f"{type(e).__name__}: {str(e)[:300]}",
                           img_per_s=None, peak_mem_mb=peak_mb(args.device) if args.device.type == "cuda" else None)
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
            rec["wall_s"] = round(time.perf_counter() - t0, 2)
            results[name] = rec
            emit(rec)
            gc.collect()
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    return results


if __name__ == "__main__":
    main()
