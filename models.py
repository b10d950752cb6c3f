"""timm backbones by name, their initialisation (ImageNet, random or a local weight file), and
weight files in safetensors that timm itself can load:

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))
"""

from pathlib import Path

import timm
import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from common import UserError, atomic_save_safetensors, load_error_reason
from distributed import world_size


def create_backbone(name: str, init: str = "imagenet", num_classes: int = 1000, img_size: int = None,
                    flag: str = "--init", **kwargs) -> nn.Module:
    """A timm model `name` with a `num_classes` head (0: pooled features only).

    init: 'imagenet' (timm's default pretrained tag, through the Hugging Face hub or its cache),
    'random', or the path of a local weight file (safetensors or a state dict). flag: the
    command-line flag that gave `init`, named in errors."""
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise UserError(f"unknown timm model '{name}' (see timm.list_models())")
    kwargs = dict(kwargs, num_classes=num_classes)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if init == "imagenet":
        try:
            return _create(name, True, kwargs)
        except (OSError, RuntimeError, ValueError) as e:  # offline: LocalEntryNotFoundError is an OSError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{flag} imagenet: could not get ImageNet weights for {name} ({first[:160]}); "
                            f"use {flag} random or {flag} PATH to a local weight file") from None
    model = _create(name, False, kwargs)
    if init != "random":
        load_weights(model, init, flag=flag)
    return model


def _create(name, pretrained, kwargs):
    """timm.create_model; CNNs take no img_size, so it is dropped for models that refuse it."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "img_size" not in kwargs or "img_size" not in str(e):
            raise
        kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
        return timm.create_model(name, pretrained=pretrained, **kwargs)


def head_prefixes(model: nn.Module):
    """Key prefixes of the classification head (allowed to be re-initialised)."""
    cls = model.pretrained_cfg.get("classifier", "fc") if hasattr(model, "pretrained_cfg") else "fc"
    cls = cls if isinstance(cls, (list, tuple)) else [cls]
    return tuple(c + "." for c in cls)


def read_state_dict(path, flag=None) -> dict:
    """Tensors of a weight file: .safetensors, or a torch state dict loaded with weights_only=True
    (nested under 'state_dict', 'model', 'teacher' or 'student' is accepted; 'module.' and
    'backbone.' prefixes are stripped). flag: the command-line flag that named the file, for errors."""
    path = Path(path).expanduser()
    where = f"{flag} {path}" if flag else f"weight file {path}"
    if not path.is_file():
        raise UserError(f"{where} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        with open(path, "rb") as f:
            head = f.read(2)
        # torch.save writes a zip archive (PK) or, in its legacy format, a pickle (protocol byte 0x80)
        reason = load_error_reason(e) if head in (b"PK", b"\x80\x02") or path.suffix == ".safetensors" else \
            "neither a safetensors file nor one torch.save wrote"
        raise UserError(f"{where} is not a readable weight file ({reason}); expected .safetensors or "
                        "a state dict of tensors saved with torch.save") from None
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{where} is not a weight file (expected a dict of tensors)")
    for prefix in ("module.", "backbone."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, path, flag="--weights", allow_new_head=True) -> list:
    """Load a weight file into `model`, checking that it fits: every backbone tensor must be present
    with the same shape. Only the classification head may be missing or of another shape (a new
    number of classes); it then keeps its fresh initialisation. Returns the re-initialised keys."""
    sd = read_state_dict(path, flag)
    own = model.state_dict()
    heads = head_prefixes(model) if allow_new_head else ()
    is_head = lambda k: k.startswith(heads)  # noqa: E731
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = _resample_pos_embed(model, sd["pos_embed"])
    missing = [k for k in own if k not in sd and not is_head(k)]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape and not is_head(k)]
    if missing or unexpected or shapes:
        what = []
        if missing:
            what.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        if shapes:
            what.append(f"{len(shapes)} of another shape (first: {shapes[0]})")
        name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        raise UserError(f"{flag} {path} does not fit {name}: " + "; ".join(what))
    fresh = [k for k in own if is_head(k) and (k not in sd or sd[k].shape != own[k].shape)]
    model.load_state_dict({k: v for k, v in sd.items() if k not in fresh}, strict=False)
    return fresh


def _resample_pos_embed(model, pos_embed):
    from timm.layers import resample_abs_pos_embed
    n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    grid = model.patch_embed.grid_size
    return resample_abs_pos_embed(pos_embed, list(grid), num_prefix_tokens=n_prefix)


def save_weights(model: nn.Module, path):
    """Atomically save the state dict as safetensors (never a pickled module)."""
    model = getattr(model, "module", model)
    atomic_save_safetensors(path, model.state_dict())


NORMS = ("paper", "model")


def model_mean_std(model: nn.Module) -> tuple:
    """The input normalisation the model's timm weights were trained with (its pretrained_cfg),
    ImageNet's when the model does not say."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


def apply_norm(model: nn.Module, norm: str):
    """--norm: 'paper' feeds every model the ImageNet-normalised input (the paper's and the data
    pipelines'); 'model' gives `model` its own weights' normalisation (e.g. mean = std = 0.5 for
    timm's augreg ViTs). Then a forward pre-hook on the model's input convolution (the stem, or a
    ViT's patch embedding: every entry point, forward or forward_features, passes it) turns the
    ImageNet-normalised input x into (x * std_in + mean_in - mean) / std per channel, i.e. the same
    [0, 1] view normalised with the model's (mean, std), within float rounding; no hook when those
    are ImageNet's. The hook is not part of the weights: a script that loads them applies it again
    (finetune.py and attention_maps.py read --norm from the weights' run folder). Returns the
    (mean, std) the model sees."""
    if norm not in NORMS:
        raise UserError(f"--norm {norm}: choose one of {', '.join(NORMS)}")
    mean_in, std_in = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    mean, std = model_mean_std(model) if norm == "model" else (mean_in, std_in)
    if (mean, std) == (mean_in, std_in):
        return mean, std
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if stem is None:
        raise UserError(f"--norm model: {type(model).__name__} has no 3-channel input convolution to normalise for")
    scale = (torch.tensor(std_in) / torch.tensor(std)).view(1, 3, 1, 1)
    shift = ((torch.tensor(mean_in) - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1)

    def renormalise(module, args):
        x = args[0]
        return (x * scale.to(x.device, x.dtype) + shift.to(x.device, x.dtype),) + tuple(args[1:])
    stem.register_forward_pre_hook(renormalise)
    return mean, std


def norm_of_weights(path) -> str:
    """The --norm of the run that wrote weight file `path` (its folder's config.json), else 'paper'."""
    import json
    cfg = Path(path).expanduser().parent / "config.json"
    try:
        return json.loads(cfg.read_text()).get("norm", "paper")
    except (OSError, ValueError, AttributeError):
        return "paper"


def is_transformer(model: nn.Module) -> bool:
    """A ViT-like timm model (patch embedding, blocks), as opposed to a CNN (channels_last on CUDA)."""
    return hasattr(model, "patch_embed") or hasattr(model, "blocks")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- several processes (torchrun)

class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch of all processes, for the
    gloo backend (torch's SyncBatchNorm only runs on GPUs). Mean and variance are two-pass sums
    all-reduced with torch.distributed.nn's differentiable all_reduce, so the gradients are those of
    the single-process BatchNorm over the global batch. Outside training or a process group it is
    plain BatchNorm. Used by the CPU test of distributed training; CUDA runs use nn.SyncBatchNorm."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x):
        if not (self.training and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64)
        dist.all_reduce(n)
        n = float(n.item())
        xf = x.float()
        mean = all_reduce(xf.sum(dims)) / n
        var = all_reduce(((xf - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1)) * m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Under torch.distributed, BatchNorm layers computing their statistics over the global batch
    (nn.SyncBatchNorm on CUDA, CpuSyncBatchNorm on the CPU); a no-op in a single process. The
    parameters and buffers are kept (the same tensors), so optimisers may be built before or after."""
    if world_size() == 1:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(m):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, CpuSyncBatchNorm):
            new = CpuSyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            if m.affine:
                new.weight, new.bias = m.weight, m.bias
            if m.track_running_stats:
                new.running_mean, new.running_var = m.running_mean, m.running_var
                new.num_batches_tracked = m.num_batches_tracked
            new.train(m.training)
            return new
        for name, child in m.named_children():
            setattr(m, name, convert(child))
        return m
    return convert(model)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` under torch.distributed (gradients averaged over the
    processes in the backward pass); the model itself in a single process."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True)


# ---------------------------------------------------------------- pretraining heads (CASS options)

class MLPHead(nn.Sequential):
    """Linear -> BatchNorm -> ReLU -> Linear: BYOL's projector and predictor (Grill et al., 2020),
    SimSiam's predictor (Chen & He, 2021)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class CassArm(nn.Module):
    """One arm of CASS with its pretraining-only heads: z = projector(pooled features) when there is a
    projector (the backbone then has no classifier), else the backbone's logits as in the paper;
    p = predictor(z) when there is a predictor. forward returns (z, p or None)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module = None, predictor: nn.Module = None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(self, x):
        z = self.backbone(x)
        if self.projector is not None:
            z = self.projector(z)
        return z, (self.predictor(z) if self.predictor is not None else None)

    def heads_state_dict(self) -> dict:
        """The heads' tensors only (what exists for pretraining alone, saved apart from the backbone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
