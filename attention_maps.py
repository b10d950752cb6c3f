"""Attention maps of a Vision Transformer and feature maps of a CNN, supervised vs CASS: the paper's
qualitative figures (Section 5.3.3, Appendix C.2-C.4).

Transformer (Figures 3 and 7-10): the self-attention of the class token (CLS) to the image patches
in the LAST block, per head and averaged over the heads, upsampled (bilinear) to the image size.
    fig3_attention_single.png   one test image: the image, the head-averaged map and every head,
                                overlaid on the image, one row per model
    fig7_attention_mean.png     the head-averaged map averaged over --n random test images (the paper:
                                30, 100 for ISIC 2019), one panel per model, shared colour scale
CNN (Figures 5 and 6): the channel-mean of the activation after each of the first five stages, for
the same test image. --feature-layers stages (default) takes timm's feature stages: for a ResNet the
stem (conv1 + BN + ReLU, 'act1') and layer1 .. layer4, i.e. the first five convolution stages.
--feature-layers convs takes the outputs of the first five Conv2d modules in execution order, a
literal reading of the paper's "after the Conv2d layer" (for a ResNet: conv1, then the first
bottleneck's convolutions).
    fig5_feature_map_stem.png   the first of them, one panel per model
    fig6_feature_maps.png       all five, one row per model

    python attention_maps.py --data synthetic --img-size 32 --arch vit_tiny_patch16_224 \\
        --weights runs/.../supervised/best.safetensors --compare runs/.../cass/best.safetensors \\
        --labels supervised,CASS --cnn resnet18 --cnn-weights A.safetensors --cnn-compare B.safetensors \\
        --n 30 --out results/figures

Weight files are those the other scripts write: finetune.py's best.safetensors (the paper compares
models fine-tuned with 100% labels) or a CASS arm (vit.safetensors / cnn.safetensors). The head size
is read from the file. Images are the test split (datasets.load_data) through eval_transform.

timm computes attention with a fused kernel by default, which never materialises the attention
matrix: a hook on attn_drop then sees nothing. Fused attention is switched off on the last block for
the extraction (and restored after), so a forward hook on blocks[-1].attn.attn_drop receives the
(B, heads, N, N) softmax attention (in eval mode the dropout is the identity).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets import load_data
from models import NORMS, apply_norm, create_backbone
from pipeline.loading import ImageDataset
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from runtime.cli import add_data_args, pick_device, run_cli
from runtime.errors import UserError
from runtime.files import atomic_save_figure, atomic_write_json
from runtime.weight_files import head_prefixes, load_weights, norm_of_weights, read_state_dict

# ---------------------------------------------------------------- extraction


def last_block_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax self-attention of the last Transformer block, (B, heads, N, N), N = prefix + patch tokens.

    Works whether or not timm's fused attention is on: it is switched off on the last block for
    this forward pass only."""
    blocks = getattr(model, "blocks", None)
    attn_mod = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn_mod is None or not hasattr(attn_mod, "attn_drop"):
        raise UserError(f"{type(model).__name__} has no ViT-style blocks[-1].attn.attn_drop; attention maps "
                        "need a timm VisionTransformer-like model (vit_*, deit_*)")
    store = []
    had_fused = getattr(attn_mod, "fused_attn", False)
    attn_mod.fused_attn = False
    handle = attn_mod.attn_drop.register_forward_hook(lambda m, i, o: store.append(o.detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        attn_mod.fused_attn = had_fused
        model.train(was_training)
    if not store:
        raise RuntimeError("the attention hook saw nothing (attention computed by another path?)")
    return store[-1].float()


def patch_grid(model: nn.Module, x: torch.Tensor):
    """(rows, cols) of the patch grid for input x."""
    pe = model.patch_embed
    ph, pw = pe.patch_size if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size, pe.patch_size)
    return x.shape[-2] // ph, x.shape[-1] // pw


def cls_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention of the class token to every patch in the last block, (B, heads, rows, cols).

    The class token is token 0; further prefix tokens (distillation or register tokens,
    model.num_prefix_tokens) are skipped, so the values over the patches sum to at most one."""
    if getattr(model, "cls_token", None) is None:
        raise UserError(f"{type(model).__name__} has no class token; CLS attention maps need one")
    attn = last_block_attention(model, x)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    gh, gw = patch_grid(model, x)
    cls_to_patches = attn[:, :, 0, prefix:]
    if cls_to_patches.shape[-1] != gh * gw:
        raise RuntimeError(f"expected {gh * gw} patch tokens after {prefix} prefix token(s), got "
                           f"{cls_to_patches.shape[-1]}")
    return cls_to_patches.reshape(attn.shape[0], attn.shape[1], gh, gw)


def upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """(..., h, w) -> (..., H, W), bilinear."""
    lead = maps.shape[:-2]
    m = maps.reshape(-1, 1, *maps.shape[-2:])
    m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
    return m.reshape(*lead, *m.shape[-2:])


def feature_layer_names(model: nn.Module, kind: str = "stages", x: torch.Tensor = None, k: int = 5) -> list:
    """Names of the first k feature layers: timm's feature stages, or the first k Conv2d modules in
    execution order (found with one forward pass of x)."""
    if kind == "stages":
        info = getattr(model, "feature_info", None)
        names = [f["module"] for f in info][:k] if info else []
        if len(names) < k:
            raise UserError(f"{type(model).__name__} lists {len(names)} feature stages; use --feature-layers convs")
        return names
    if kind != "convs":
        raise UserError(f"--feature-layers {kind}: choose stages or convs")
    order, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda m, i, o, name=name: order.append(name)))
    try:
        with torch.no_grad():
            model.eval()(x if x is not None else torch.zeros(1, 3, 64, 64))
    finally:
        for h in handles:
            h.remove()
    names = list(dict.fromkeys(order))[:k]
    if len(names) < k:
        raise UserError(f"{type(model).__name__} has only {len(names)} Conv2d layers")
    return names


def feature_maps(model: nn.Module, x: torch.Tensor, kind: str = "stages", k: int = 5) -> list:
    """[(layer name, activation (B, C, h, w))] after each of the first k feature layers."""
    names = feature_layer_names(model, kind, x, k)
    acts, handles = {}, []
    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_hook(lambda m, i, o, name=name: acts.setdefault(name, o.detach())))
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [(n, acts[n].float()) for n in names]


# ---------------------------------------------------------------- models and images

def load_model(arch: str, weights, img_size: int, norm: str = None) -> nn.Module:
    """A timm model `arch` holding a weight file (its head size read from the file), in eval mode,
    normalising its input as `norm` says (models.apply_norm; None: as the run that wrote the file)."""
    sd = read_state_dict(weights)
    probe = create_backbone(arch, "random", num_classes=1000, img_size=img_size)
    num_classes = 0
    for prefix in head_prefixes(probe):
        w = sd.get(prefix + "weight")
        if w is not None:
            num_classes = int(w.shape[0])
    model = create_backbone(arch, "random", num_classes=num_classes, img_size=img_size)
    load_weights(model, weights, flag=f"weights of {arch}")
    apply_norm(model, norm or norm_of_weights(weights))
    return model.eval()


def denormalize(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) image in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def test_images(args):
    """(the single image (1, 3, H, W), its id, the N sampled images (N, 3, H, W), their ids)."""
    table, split = load_data(args)
    rows = np.asarray(split["test"])
    if len(rows) == 0:
        raise UserError(f"the test split of --data {args.data} is empty")
    if not 0 <= args.index < len(rows):
        raise UserError(f"--index {args.index}: the test split has {len(rows)} images")
    ds = ImageDataset(table, rows, eval_transform(args.img_size))
    single = ds[args.index][0].unsqueeze(0)
    n = min(args.n, len(rows))
    pick = np.sort(np.random.default_rng(args.sample_seed).choice(len(rows), n, replace=False))
    many = torch.stack([ds[int(i)][0] for i in pick])
    return single, table.ids[rows[args.index]], many, [table.ids[rows[i]] for i in pick]


def batched(fn, x, bs=32):
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


# ---------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_single(image, maps, labels, path, title):
    """Figure 3: per model a row: the image, the head-averaged CLS attention overlaid, then each head
    (colour scale shared within the row, from its smallest to its largest value)."""
    plt = _plt()
    heads = maps[0].shape[0]
    cols = 2 + heads
    fig, axes = plt.subplots(len(maps), cols, figsize=(2.1 * cols + 0.8, 2.3 * len(maps)), squeeze=False)
    img = denormalize(image[0])
    for r, (m, lab) in enumerate(zip(maps, labels)):
        up = upsample(m, img.shape[:2]).numpy()  # (heads, H, W)
        panels = [("mean over heads", up.mean(0))] + [(f"head {h + 1}", up[h]) for h in range(heads)]
        vmin, vmax = min(float(p.min()) for _, p in panels), max(float(p.max()) for _, p in panels)
        ax = axes[r][0]
        ax.imshow(img)
        ax.set_title(f"{lab}: input", fontsize=8)
        ax.axis("off")
        for c, (name, p) in enumerate(panels, start=1):
            ax = axes[r][c]
            ax.imshow(img)
            im = ax.imshow(p, cmap="jet", alpha=0.55, vmin=vmin, vmax=vmax)
            ax.set_title(f"{lab}: {name}", fontsize=8)
            ax.axis("off")
        fig.colorbar(im, ax=list(axes[r]), fraction=0.015, pad=0.01, label="CLS attention")
    fig.suptitle(title, fontsize=9)
    atomic_save_figure(path, fig)
    plt.close(fig)


def plot_mean(means, labels, path, title):
    """Figures 7-10: the head- and image-averaged CLS attention of each model, shared colour scale."""
    plt = _plt()
    vmin, vmax = min(float(m.min()) for m in means), max(float(m.max()) for m in means)
    fig, axes = plt.subplots(1, len(means), figsize=(3.6 * len(means) + 0.8, 3.4), squeeze=False)
    for ax, m, lab in zip(axes[0], means, labels):
        im = ax.imshow(m, cmap="jet", vmin=vmin, vmax=vmax)
        ax.set_title(lab, fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, pad=0.02, label="mean CLS attention")
    fig.suptitle(title, fontsize=9)
    atomic_save_figure(path, fig)
    plt.close(fig)


def plot_features(fmaps, labels, path, title, first_only=False):
    """Figures 5-6: channel-mean activation of each layer, one row per model, one colour bar per panel."""
    plt = _plt()
    layers = 1 if first_only else len(fmaps[0])
    rows, cols = (1, len(fmaps)) if first_only else (len(fmaps), layers)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.9 * rows), squeeze=False)
    for r, (fm, lab) in enumerate(zip(fmaps, labels)):
        for c in range(layers):
            name, act = fm[c]
            ax = axes[0][r] if first_only else axes[r][c]
            im = ax.imshow(act[0].mean(0).numpy(), cmap="viridis")
            ax.set_title(f"{lab}: {name} ({act.shape[1]} ch, {act.shape[2]}x{act.shape[3]})", fontsize=8)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_save_figure(path, fig)
    plt.close(fig)


def attention_stats(mean_map: np.ndarray) -> dict:
    """Summary numbers of a mean CLS attention map on the patch grid: its total (the share of the
    class token's attention that goes to patches), the normalised entropy of its distribution over
    the patches (1 = uniform), and the share in the central patches (about half the image's area;
    centre_area says how much exactly on this grid, i.e. what a uniform map would give)."""
    p = mean_map / mean_map.sum()
    ent = float(-(p * np.log(p + 1e-12)).sum() / np.log(p.size)) if p.size > 1 else 0.0
    h, w = p.shape
    ch, cw = int(round(h * (1 - 0.5 ** 0.5) / 2)), int(round(w * (1 - 0.5 ** 0.5) / 2))
    centre = float(p[ch:h - ch, cw:w - cw].sum())
    area = (h - 2 * ch) * (w - 2 * cw) / (h * w)
    return {"patch_mass": float(mean_map.sum()), "normalised_entropy": ent, "centre_mass": centre,
            "centre_area": area}


# ---------------------------------------------------------------- main

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = add_data_args(p.add_argument_group("data (as the other scripts)"))
    g.add_argument("--img-size", type=int, default=384, help="input size the weights were trained at")
    g.add_argument("--norm", choices=NORMS, default=None,
                   help="input normalisation of the models (see finetune.py --norm); default: each weight file's "
                        "own, from its run folder's config.json, else paper")
    g = p.add_argument_group("Transformer attention maps")
    g.add_argument("--arch", default=None, help="timm name of the Transformer (e.g. vit_base_patch16_384)")
    g.add_argument("--weights", default=None, help="its first weight file (e.g. supervised best.safetensors)")
    g.add_argument("--compare", default=None, help="its second weight file (e.g. CASS best.safetensors)")
    g.add_argument("--labels", default="supervised,CASS", help="names of the first and second weight files")
    g.add_argument("--n", type=int, default=30, help="test images averaged in the mean map (paper: 30; ISIC 100)")
    g.add_argument("--index", type=int, default=0, help="position in the test split of the single image")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the choice of the N test images")
    g = p.add_argument_group("CNN feature maps")
    g.add_argument("--cnn", default=None, help="timm name of the CNN (e.g. resnet50)")
    g.add_argument("--cnn-weights", default=None, help="its first weight file")
    g.add_argument("--cnn-compare", default=None, help="its second weight file")
    g.add_argument("--feature-layers", choices=("stages", "convs"), default="stages",
                   help="stages: stem + layer1..4 (timm feature stages); convs: the first five Conv2d outputs")
    p.add_argument("--out", default="results/figures", help="output folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA if present)")
    args = p.parse_args(argv)
    args.labels = [s.strip() for s in args.labels.split(",")]
    if len(args.labels) != 2:
        raise UserError("--labels: give two names, comma-separated (e.g. supervised,CASS)")
    if not (args.arch and args.weights) and not (args.cnn and args.cnn_weights):
        raise UserError("give --arch and --weights (attention maps) and/or --cnn and --cnn-weights (feature maps)")
    if args.n < 1:
        raise UserError("--n must be at least 1")
    return args


def main(argv=None):
    args = get_args(argv)
    out = Path(args.out)
    device = pick_device(args.device)
    single, single_id, many, many_ids = test_images(args)
    summary = {"data": args.data, "single_image": single_id, "n": len(many_ids), "labels": args.labels}
    written = []

    if args.arch and args.weights:
        files = [args.weights] + ([args.compare] if args.compare else [])
        labels = args.labels[:len(files)]
        singles, means, grids = [], [], []
        for f in files:
            model = load_model(args.arch, f, args.img_size, args.norm).to(device)
            singles.append(cls_attention(model, single.to(device)).cpu()[0])  # (heads, gh, gw)
            m = batched(lambda x: cls_attention(model, x.to(device)).cpu().mean(1), many)  # (N, gh, gw)
            grids.append(m.mean(0).numpy())
            means.append(upsample(m, many.shape[-2:]).mean(0).numpy())
        heads, gh, gw = singles[0].shape
        what = f"{args.arch}, last block, CLS -> {gh}x{gw} patches"
        plot_single(single, singles, labels, out / "fig3_attention_single.png",
                    f"Figure 3: CLS attention on one test image of {args.data} ({single_id}); {what}; {heads} heads")
        plot_mean(means, labels, out / "fig7_attention_mean.png",
                  f"Figures 7-10: CLS attention (mean over heads) averaged over {len(many_ids)} test images of "
                  f"{args.data}; {what}")
        written += ["fig3_attention_single.png", "fig7_attention_mean.png"]
        summary["attention"] = {lab: attention_stats(g) for lab, g in zip(labels, grids)}
        summary["attention_grid"] = [gh, gw]

    if args.cnn and args.cnn_weights:
        files = [args.cnn_weights] + ([args.cnn_compare] if args.cnn_compare else [])
        labels = args.labels[:len(files)]
        fmaps = []
        for f in files:
            model = load_model(args.cnn, f, args.img_size, args.norm).to(device)
            fmaps.append([(n, a.cpu()) for n, a in feature_maps(model, single.to(device), args.feature_layers)])
        names = [n for n, _ in fmaps[0]]
        plot_features(fmaps, labels, out / "fig5_feature_map_stem.png",
                      f"Figure 5: {args.cnn} channel-mean activation after '{names[0]}' on test image {single_id}",
                      first_only=True)
        plot_features(fmaps, labels, out / "fig6_feature_maps.png",
                      f"Figure 6: {args.cnn} channel-mean activations after its first five "
                      f"{'stages' if args.feature_layers == 'stages' else 'Conv2d layers'} ({', '.join(names)}) "
                      f"on test image {single_id}")
        written += ["fig5_feature_map_stem.png", "fig6_feature_maps.png"]
        summary["feature_layers"] = names

    atomic_write_json(out / "maps_summary.json", summary)
    print(f"wrote {', '.join(written)} and maps_summary.json to {out}/")
    if "attention" in summary:
        for lab, s in summary["attention"].items():
            print(f"  {lab}: normalised entropy {s['normalised_entropy']:.3f}, centre mass {s['centre_mass']:.3f} "
                  f"(uniform: {s['centre_area']:.3f}), CLS->patch mass {s['patch_mass']:.3f}")


if __name__ == "__main__":
    run_cli(main)
