"""Weight files: reading a safetensors file or a torch state dict (as DINO, the scripts and timm
write them), loading one into a timm model with a check that it fits (only the classifier may be new),
and the --norm of the run that wrote one. models.create_backbone imports it only for --init PATH;
finetune.py and attention_maps.py, which always read weight files, at start."""

import json
from pathlib import Path

import torch
from torch import nn

from runtime.cli import load_error_reason
from runtime.errors import UserError


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


def norm_of_weights(path) -> str:
    """The --norm of the run that wrote weight file `path` (its folder's config.json), else 'paper'."""
    cfg = Path(path).expanduser().parent / "config.json"
    try:
        return json.loads(cfg.read_text()).get("norm", "paper")
    except (OSError, ValueError, AttributeError):
        return "paper"
