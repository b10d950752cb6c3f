"""Loss functions: the CASS loss with the paper's collapse guard, the focal loss used for
fine-tuning with its class weights, and the DINO loss of the baseline.

Each takes plain tensors; none keeps hidden state except DINOLoss's centre."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------- CASS (Equation 1, Algorithm 1)

# Algorithm 1 writes the noise as N(1e-6, 1e-9) for the CNN and N(1e-10, 1e-15) for the
# Transformer; we read the pairs as (mean, standard deviation).
CNN_NOISE = (1e-6, 1e-9)
VIT_NOISE = (1e-10, 1e-15)


def cass_loss(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Equation 1: 2 - 2 cos(r, t) per sample, averaged over the batch. Gradients flow into both."""
    return (2 - 2 * (F.normalize(r.float(), dim=-1) * F.normalize(t.float(), dim=-1)).sum(-1)).mean()


def collapse_guard(r: torch.Tensor, t: torch.Tensor):
    """Algorithm 1: if the two arms' outputs are identical, add Gaussian noise to both.

    Returns (r, t, fired) where `fired` is a 0-dim bool tensor. Decided on the device without a
    host sync: the noise is drawn every step and added only when the outputs are equal."""
    fired = (r == t).all()
    noise_r = torch.randn_like(r) * CNN_NOISE[1] + CNN_NOISE[0]
    noise_t = torch.randn_like(t) * VIT_NOISE[1] + VIT_NOISE[0]
    return torch.where(fired, r + noise_r, r), torch.where(fired, t + noise_t, t), fired


class CASSLoss(nn.Module):
    """The CASS objective on the two arms' logits.

    head_act: 'none' (the paper), or 'softmax' / 'sigmoid' applied to the logits first (Table 11)."""

    def __init__(self, head_act: str = "none", guard: bool = True):
        super().__init__()
        if head_act not in ("none", "softmax", "sigmoid"):
            raise ValueError(f"head_act must be none, softmax or sigmoid, not {head_act}")
        self.head_act, self.guard = head_act, guard

    def forward(self, r, t):
        r, t = r.float(), t.float()
        if self.head_act == "softmax":
            r, t = r.softmax(-1), t.softmax(-1)
        elif self.head_act == "sigmoid":
            r, t = r.sigmoid(), t.sigmoid()
        fired = torch.zeros((), dtype=torch.bool, device=r.device)
        if self.guard:
            r, t, fired = collapse_guard(r, t)
        return cass_loss(r, t), fired


# ---------------------------------------------------------------- focal loss for fine-tuning

def class_weights(counts, mode: str = "minmax") -> torch.Tensor:
    """Per-class weights from the class counts of the labelled training set.

    minmax: the paper's "min-max normalised class distribution" as the authors coded it,
      0.2 + 0.8 (c - min) / (max - min): the most frequent class gets 1.0, the rarest 0.2.
    inverse: n / (C c), scikit-learn's 'balanced' weighting (rare classes weigh more).
    none: all ones."""
    c = np.asarray(counts, dtype=np.float64)
    if mode == "minmax":
        w = np.ones_like(c) if c.max() == c.min() else 0.2 + 0.8 * (c - c.min()) / (c.max() - c.min())
    elif mode == "inverse":
        w = c.sum() / (len(c) * np.maximum(c, 1))
    elif mode == "none":
        w = np.ones_like(c)
    else:
        raise ValueError(f"class weight mode must be minmax, inverse or none, not {mode}")
    return torch.tensor(w, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017) with alpha as a plain multiplier, as in the paper's code.

    Multi-class (targets are class indices): softmax focal,
        -alpha * w[y] * (1 - p_y)^gamma * log p_y, averaged over the batch.
    Multi-label (targets are a 0/1 matrix): sigmoid focal per label,
        alpha * w[l] * (1 - p_t)^gamma * BCE, averaged over batch x labels."""

    def __init__(self, alpha: float = 1.0, gamma: float = 2.0, weight: torch.Tensor = None,
                 multilabel: bool = False):
        super().__init__()
        self.alpha, self.gamma, self.multilabel = alpha, gamma, multilabel
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits, target):
        logits = logits.float()
        if self.multilabel:
            target = target.float()
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            p_t = torch.exp(-bce)
            loss = self.alpha * (1 - p_t) ** self.gamma * bce
            if self.weight is not None:
                loss = loss * self.weight
            return loss.mean()
        logp = F.log_softmax(logits, -1).gather(1, target.long()[:, None]).squeeze(1)
        loss = -self.alpha * (1 - logp.exp()) ** self.gamma * logp
        if self.weight is not None:
            loss = loss * self.weight[target.long()]
        return loss.mean()
