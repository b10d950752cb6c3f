"""Loss functions: the CASS loss with the paper's collapse guard, the focal loss used for
fine-tuning with its class weights, and the DINO loss of the baseline.

Each takes plain tensors; none keeps hidden state except DINOLoss's centre."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.distributed import all_reduce_sum, world_size

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


def predictor_loss(pr: torch.Tensor, pt: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetrised loss between the arms: (D(pr, sg(t)) + D(pt, sg(r))) / 2 with D the
    loss of Equation 1 and sg a stop-gradient; pr, pt the predictors' outputs on r, t. Each arm learns
    only through its own predictor's term, towards the other arm's output held fixed."""
    return 0.5 * (cass_loss(pr, t.detach()) + cass_loss(pt, r.detach()))


def variance_hinge(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's variance term (Bardes et al., 2022): mean over dimensions of relu(1 - sqrt(var + eps)),
    the variance over the batch (unbiased), so every output dimension keeps a std of at least 1."""
    return F.relu(1 - torch.sqrt(z.float().var(0) + eps)).mean()


def covariance_penalty(z: torch.Tensor) -> torch.Tensor:
    """VICReg's covariance term: the sum of the squared off-diagonal entries of the batch covariance
    matrix of z, divided by the dimension, so that the dimensions carry different information."""
    z = z.float() - z.float().mean(0)
    c = z.T @ z / (len(z) - 1)
    off = c - torch.diag(torch.diag(c))
    return (off * off).sum() / z.shape[1]


class CASSLoss(nn.Module):
    """The CASS objective on the two arms' outputs (the paper: their logits).

    head_act: 'none' (the paper), or 'softmax' / 'sigmoid' applied to the outputs first (Table 11).
    With the predictors' outputs pr, pt, Equation 1 becomes predictor_loss (pretrain_cass --predictor).
    var_reg W > 0 adds W x (variance_hinge + cov_weight x covariance_penalty) of each arm's outputs
    (--var-reg; VICReg weighs variance 25 and covariance 1, hence cov_weight 0.04)."""

    def __init__(self, head_act: str = "none", guard: bool = True, var_reg: float = 0.0, cov_weight: float = 0.04):
        super().__init__()
        if head_act not in ("none", "softmax", "sigmoid"):
            raise ValueError(f"head_act must be none, softmax or sigmoid, not {head_act}")
        self.head_act, self.guard, self.var_reg, self.cov_weight = head_act, guard, var_reg, cov_weight

    def _act(self, z):
        if self.head_act == "softmax":
            return z.softmax(-1)
        if self.head_act == "sigmoid":
            return z.sigmoid()
        return z

    def forward(self, r, t, pr=None, pt=None):
        r, t = self._act(r.float()), self._act(t.float())
        fired = torch.zeros((), dtype=torch.bool, device=r.device)
        if self.guard:
            r, t, fired = collapse_guard(r, t)
        if pr is None:
            loss = cass_loss(r, t)
        else:
            loss = predictor_loss(self._act(pr.float()), self._act(pt.float()), r, t)
        if self.var_reg:
            loss = loss + self.var_reg * sum(variance_hinge(z) + self.cov_weight * covariance_penalty(z)
                                             for z in (r, t))
        return loss, fired


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


# ---------------------------------------------------------------- DINO (Caron et al., 2021), the baseline

def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int,
                          epochs: int) -> np.ndarray:
    """Teacher temperature of each epoch, as official DINO: np.linspace(warmup_teacher_temp,
    teacher_temp, warmup_epochs) over the first warmup_epochs epochs, then teacher_temp.
    A warm-up longer than the run is cut off at the last epoch (official DINO would fail)."""
    warm = np.linspace(warmup_teacher_temp, teacher_temp, max(warmup_epochs, 0))
    rest = np.full(max(epochs - max(warmup_epochs, 0), 0), teacher_temp)
    return np.concatenate([warm, rest])[:epochs]


class DINOLoss(nn.Module):
    """The DINO objective (official facebookresearch/dino `DINOLoss`).

    student_output: (n_crops * B, K) logits, crop-major (the B rows of crop 0, then of crop 1, ...);
    teacher_output: (2 * B, K) logits of the two global crops, in the same order as the student's
    first two crops. For each teacher crop i and student crop v != i the loss is the cross-entropy
    -sum softmax((t_i - C) / T_t) * log_softmax(s_v / T_s), averaged over the batch; the result is
    the mean over those pairs. After the loss the centre C (a buffer, kept in the state dict) moves
    towards the teacher's batch mean with momentum `center_momentum`. The teacher temperature T_t
    follows `teacher_temp_schedule`, indexed by epoch."""

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, nepochs: int = 100, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        if ncrops < 2:
            raise ValueError("DINO needs at least the two global crops")
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp,
                                                           warmup_teacher_temp_epochs, nepochs)

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def forward(self, student_output, teacher_output, epoch: int, return_stats: bool = False):
        """The loss (and, with return_stats, a dict of 0-dim tensors, no host sync):
        teacher_entropy: mean entropy (nats) of the teacher's sharpened distributions; ln K means
          a uniform output (collapse to uniform), 0 a one-hot output (collapse to one dimension);
        teacher_kl_to_mean: mean KL(p_i || mean_j p_j) over the teacher's rows, i.e. how much the
          output depends on the image; 0 means every image gets the same distribution (collapse);
        student_kl: the loss minus teacher_entropy, the mean KL(teacher || student) over pairs."""
        student_out = (student_output.float() / self.student_temp).chunk(self.ncrops)
        t = teacher_output.float().detach()
        q_all = F.softmax((t - self.center) / self.teacher_temp(epoch), dim=-1)
        teacher_out = q_all.chunk(2)
        log_p = [F.log_softmax(s, dim=-1) for s in student_out]
        total, n_terms = 0.0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:  # the same view on both sides: skipped
                    continue
                total = total + torch.sum(-q * log_p[v], dim=-1).mean()
                n_terms += 1
        loss = total / n_terms
        stats = None
        if return_stats:
            with torch.no_grad():
                ent = torch.special.entr(q_all).sum(-1).mean()
                ent_mean = torch.special.entr(q_all.mean(0)).sum()
                stats = {"teacher_entropy": ent, "teacher_kl_to_mean": ent_mean - ent,
                         "student_kl": loss.detach() - ent}
        self.update_center(t)
        return (loss, stats) if return_stats else loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        """Under torch.distributed the batch mean is over every process's teacher outputs (one
        all-reduce, as official DINO), so the centre stays the same on every process."""
        batch_center = all_reduce_sum(teacher_output.float().sum(0, keepdim=True))
        n = len(teacher_output) * world_size()
        batch_center = batch_center / n
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
