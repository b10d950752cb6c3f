"""The feature monitors of a pretraining run (evaluation/monitors.py holds the rest and the plot): the pooled
backbone features of a fixed sample of training images, measured after every epoch with --monitor
(the default), give their spread, their effective rank and an online k-NN accuracy. Imported by the
pretraining scripts only with --monitor.

- effective rank (RankMe; Garrido et al., ICML 2023): exp of the entropy of the normalised singular
  values of the pooled features of that sample. Between 1 (every image on one line) and min(n, d).
- online k-NN accuracy (as solo-learn and lightly report it): the same sample's frozen pooled
  features, with their labels, vote by cosine similarity (k = 20) for each image of a fixed sample of
  the validation split. This one uses labels, but only to read the features, never to train.
"""

import math
import time

import numpy as np
import torch

from evaluation.monitors import even_spread, spread


def effective_rank(feats: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe: exp(-sum p_k log p_k), p_k = s_k / sum(s) + eps, s the singular values of feats (n, d)."""
    s = torch.linalg.svdvals(feats.double())
    p = s / s.sum().clamp_min(1e-300) + eps
    return math.exp(-(p * p.log()).sum().item())


def knn_accuracy(train_feats, train_y, test_feats, test_y, k=20, num_classes=None, multilabel=False) -> float:
    """Accuracy of knn_probs' prediction; multi-label: the fraction of (image, label) pairs right, a
    label predicted when more than half of the neighbours have it."""
    train_feats, test_feats = np.asarray(train_feats, np.float64), np.asarray(test_feats, np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    k = min(k, len(train_feats))
    if num_classes is None:
        num_classes = train_y.shape[1] if multilabel else int(max(train_y.max(), test_y.max())) + 1
    from evaluation.probes import knn_probs
    probs = knn_probs(train_feats, train_y, test_feats, k, num_classes, multilabel)
    if multilabel:
        return float(((probs > 0.5) == (test_y > 0.5)).mean())
    return float((probs.argmax(1) == test_y.astype(int)).mean())


def pooled_features(model, x):
    """The pooled backbone features of a timm model (before its classifier, whatever num_classes)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


class Monitor:
    """Feature monitors of one or more backbones on fixed images: `n_bank` training images (seeded
    sample, with their labels: the k-NN memory bank and the effective-rank sample) and `n_val`
    validation images (the k-NN queries), resized to img_size with the evaluation transform and held in
    memory, so that each epoch costs two forward passes over n_bank + n_val images and no data
    loading. Nothing here draws from the global random streams or changes a model's state: training
    continues exactly as it would without the monitor."""

    def __init__(self, table, split, img_size, device, n_bank=512, n_val=256, k=20, seed=0, bs=128):
        from pipeline.loading import ImageDataset
        from pipeline.transforms import eval_transform
        rng = np.random.default_rng(seed)
        train, val = np.asarray(split["train"]), np.asarray(split.get("val", []))
        bank = np.sort(rng.permutation(train)[:n_bank])
        val = np.sort(rng.permutation(val)[:n_val]) if len(val) else bank  # no validation split: the bank itself
        tf = eval_transform(img_size)  # ImageNet-normalised, as training's view (--norm model: the models' hooks)
        self.device, self.bs, self.k = device, bs, k
        self.multilabel, self.num_classes = table.multilabel, len(table.class_names)
        self.x, self.y = {}, {}
        for part, rows in (("bank", bank), ("val", val)):
            ds = ImageDataset(table, rows, tf)
            self.x[part] = torch.stack([ds[i][0] for i in range(len(ds))]) if len(ds) else torch.zeros(0)
            self.y[part] = np.asarray(table.labels)[rows]
        self.self_query = val is bank

    @torch.no_grad()
    def features(self, model, part: str) -> torch.Tensor:
        from runtime.cli import autocast
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(self.x[part]), self.bs):
            xb = self.x[part][i:i + self.bs].to(self.device, non_blocking=True)
            with autocast(self.device):
                out.append(pooled_features(model, xb).float().cpu())
        model.train(was_training)
        return torch.cat(out)

    def measure(self, models: dict) -> dict:
        """{name}_feat_std, _feat_std_frac, _rank, _knn for each named backbone, and monitor_seconds."""
        t0, row = time.perf_counter(), {}
        for name, model in models.items():
            bank = self.features(model, "bank")
            val = bank if self.self_query else self.features(model, "val")
            d = bank.shape[1]
            row[f"{name}_feat_std"] = s = spread(bank)
            row[f"{name}_feat_std_frac"] = s / even_spread(d)
            row[f"{name}_rank"] = effective_rank(bank)
            row[f"{name}_knn"] = knn_accuracy(bank.numpy(), self.y["bank"], val.numpy(), self.y["val"], self.k,
                                              self.num_classes, self.multilabel)
        row["monitor_seconds"] = time.perf_counter() - t0
        return row
