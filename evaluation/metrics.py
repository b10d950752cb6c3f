"""Test metrics of a classifier, computed with scikit-learn on the whole test set: macro/micro/weighted
F1, balanced accuracy (macro recall, ISIC 2019's metric), accuracy, per-class precision/recall/F1,
confusion matrix and one-vs-rest AUROC; the predictions file and the confusion-matrix figure
(finetune.py writes them)."""

import csv
import warnings

import numpy as np
import torch

from runtime.files import atomic_save_figure, atomic_write


def compute_metrics(y_true, probs, class_names, multilabel: bool, threshold: float = 0.5) -> dict:
    """Test metrics with scikit-learn from the true labels and the predicted probabilities.

    Single-label: y_true class indices (N,), probs (N, C) softmax; prediction = argmax. The F1
    averages are scikit-learn's over the classes present in y_true or the predictions;
    balanced_accuracy is the mean recall over the classes present in y_true; auroc_macro is the
    one-vs-rest macro AUROC, None when a class is absent from the test set.
    Multi-label: y_true (N, L) 0/1, probs (N, L) sigmoid; prediction = probs >= threshold.
    balanced_accuracy is the mean over labels of each label's balanced accuracy (mean of its
    sensitivity and specificity; a label with no positive in the test set counts its specificity
    only); auroc_macro the mean per-label AUROC, None when some label has only one outcome in the
    test set (the per-label values are still given where defined)."""
    from sklearn import metrics as skm
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    C = len(class_names)
    m = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # absent classes: handled explicitly below
        if not multilabel:
            y_true = y_true.astype(int)
            y_pred = probs.argmax(1)
            for avg in ("macro", "micro", "weighted"):
                m[f"f1_{avg}"] = float(skm.f1_score(y_true, y_pred, average=avg, zero_division=0))
            m["balanced_accuracy"] = float(skm.balanced_accuracy_score(y_true, y_pred))
            m["accuracy"] = float(skm.accuracy_score(y_true, y_pred))
            present = np.unique(y_true)
            if len(present) < C:
                m["auroc_macro"] = None
            elif C == 2:
                m["auroc_macro"] = float(skm.roc_auc_score(y_true, probs[:, 1]))
            else:
                p = probs / probs.sum(1, keepdims=True)
                m["auroc_macro"] = float(skm.roc_auc_score(y_true, p, multi_class="ovr", average="macro",
                                                           labels=list(range(C))))
            prec, rec, f1, sup = skm.precision_recall_fscore_support(y_true, y_pred, labels=list(range(C)),
                                                                     zero_division=0)
            m["per_class"] = {n: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                                  "support": int(sup[i])} for i, n in enumerate(class_names)}
            m["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=list(range(C))).tolist()
        else:
            y_true = (y_true > 0.5).astype(int)
            y_pred = (probs >= threshold).astype(int)
            for avg in ("macro", "micro", "samples", "weighted"):
                m[f"f1_{avg}"] = float(skm.f1_score(y_true, y_pred, average=avg, zero_division=0))
            bacc = [float(skm.balanced_accuracy_score(y_true[:, j], y_pred[:, j])) for j in range(C)]
            m["balanced_accuracy"] = float(np.mean(bacc))
            m["accuracy"] = float(skm.accuracy_score(y_true, y_pred))  # exact match of the label set
            auroc = [float(skm.roc_auc_score(y_true[:, j], probs[:, j])) if 0 < y_true[:, j].sum() < len(y_true)
                     else None for j in range(C)]
            m["auroc_macro"] = None if None in auroc else float(np.mean(auroc))
            prec, rec, f1, sup = skm.precision_recall_fscore_support(y_true, y_pred, zero_division=0)
            m["per_class"] = {n: {"precision": float(prec[j]), "recall": float(rec[j]), "f1": float(f1[j]),
                                  "support": int(sup[j]), "balanced_accuracy": bacc[j], "auroc": auroc[j]}
                              for j, n in enumerate(class_names)}
            m["confusion_matrix"] = skm.multilabel_confusion_matrix(y_true, y_pred).tolist()
            m["threshold"] = threshold
    return m


def write_predictions(path, ids, y_true, probs, class_names, multilabel, threshold):
    """predictions.csv, one row per test image. Single-label: id, y_true, y_pred (class indices, in
    the order of metrics.json's class_names), prob_<class>. Multi-label: id, true_<label>,
    pred_<label>, prob_<label>."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            if multilabel:
                w.writerow(["id"] + [f"{k}_{n}" for k in ("true", "pred", "prob") for n in class_names])
                for i, t, p in zip(ids, y_true, probs):
                    w.writerow([i] + [int(v > 0.5) for v in t] + [int(v >= threshold) for v in p]
                               + [f"{v:.9g}" for v in p])
            else:
                w.writerow(["id", "y_true", "y_pred"] + [f"prob_{n}" for n in class_names])
                for i, t, p in zip(ids, y_true, probs):
                    w.writerow([i, int(t), int(np.argmax(p))] + [f"{v:.9g}" for v in p])
    atomic_write(path, write)


def plot_confusion(path, metrics, class_names, multilabel, title):
    """confusion_matrix.png: the C x C matrix (rows true, columns predicted), or for multi-label one
    2 x 2 matrix per label (rows: label absent/present, columns: predicted absent/present)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm_all = np.asarray(metrics["confusion_matrix"])
    cms = list(cm_all) if multilabel else [cm_all]
    names = class_names if multilabel else [title]
    ticks = [["absent", "present"]] * len(cms) if multilabel else [class_names]
    n = len(cms)
    size = 3.0 if multilabel else max(4.0, 0.6 * len(class_names) + 2)
    fig, axes = plt.subplots(1, n, figsize=(size * n, size), squeeze=False)
    for ax, cm, name, tk in zip(axes[0], cms, names, ticks):
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center",
                    color="white" if v > cm.max() / 2 else "black", fontsize=8)
        ax.set_xticks(range(len(tk)), tk, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(tk)), tk, fontsize=8)
        ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(name, fontsize=9)
    if multilabel:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_save_figure(path, fig)
    plt.close(fig)


def to_probs(logits, multilabel):
    t = torch.from_numpy(logits)
    return (t.sigmoid() if multilabel else t.softmax(-1)).numpy()
