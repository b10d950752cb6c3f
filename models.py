"""timm backbones by name, their initialisation (ImageNet, random or a local weight file: runtime/weight_files.py),
input normalisation, BatchNorm synchronised under torchrun, the CASS option heads, and weight files
saved in safetensors, which timm itself can load:

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))
"""

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from runtime.distributed import world_size
from runtime.errors import UserError
from runtime.files import atomic_save_safetensors


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
        from runtime.weight_files import load_weights
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
    consts = {}  # (device, dtype) -> (scale, shift) there: copied once (a copy from the host blocks on CUDA)

    def renormalise(module, args):
        x = args[0]
        key = (x.device, x.dtype)
        if key not in consts:
            consts[key] = (scale.to(x.device, x.dtype), shift.to(x.device, x.dtype))
        s, b = consts[key]
        return (x * s + b,) + tuple(args[1:])
    stem.register_forward_pre_hook(renormalise)
    return mean, std


def is_transformer(model: nn.Module) -> bool:
    """A Transformer (timm's ViT, DeiT, Swin, BEiT, EVA, ...: they cut the image into patches with a
    patch embedding, `patch_embed`) as opposed to a CNN (ResNet, DenseNet, EfficientNet, MobileNet,
    ConvNeXt; hybrids such as CoAtNet count as CNNs: convolutional stems and stages). CNNs run in
    channels_last on CUDA, and DINO gives Transformers its default drop path. (EfficientNet and
    MobileNetV3 also have `blocks`, so that attribute says nothing.)"""
    from timm.models import VisionTransformer
    model = backbone_of(model)
    return isinstance(model, VisionTransformer) or hasattr(model, "patch_embed")


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm model inside the wrappers the scripts put around it: torch.compile (`_orig_mod`),
    DistributedDataParallel (`module`), a CassArm or DINO's MultiCropNet (`backbone`)."""
    while True:
        inner = next((getattr(model, a) for a in ("_orig_mod", "module", "backbone")
                      if isinstance(getattr(model, a, None), nn.Module)), None)
        if inner is None:
            return model
        model = inner


def uses_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether `model` (or the backbone inside its wrappers) runs in channels_last on `device`: every
    CNN on CUDA, whichever arm it is (e.g. CASS --vit densenet161), never a Transformer."""
    return device.type == "cuda" and not is_transformer(model)


def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The input batch x in channels_last when asked, else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- several processes (torchrun)

def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Under torch.distributed, BatchNorm layers computing their statistics over the global batch
    (timm's conversion on CUDA: nn.SyncBatchNorm, and timm.layers.SyncBatchNormAct for timm's fused
    BatchNormAct2d, which keeps its activation and dropout; cpu_sync_batchnorm on the CPU, likewise);
    a no-op in a single process. The parameters and buffers are kept (the same tensors), so
    optimisers may be built before or after. (torch's own nn.SyncBatchNorm.convert_sync_batchnorm
    turns a BatchNormAct2d into a plain BatchNorm: DenseNet, EfficientNet and MobileNet would lose
    their activations.)"""
    if world_size() == 1:
        return model
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm
        return convert_sync_batchnorm(model)

    from runtime.cpu_sync_batchnorm import convert_to_cpu_sync_batchnorm
    return convert_to_cpu_sync_batchnorm(model)


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
