"""The numbers the CASS paper reports, typed in from its text (Singh & Cirrone, "Cross-Architectural
Positive Pairs improve the effectiveness of Self-Supervised Learning", 2023), as data for the
"paper" column of study/tables.py.

Every value is a (mean, spread) pair exactly as printed. The paper says it reports "mean results
with variance" over five seeds (Appendix C.5.1), so the spread may be a variance rather than a
standard deviation; our tables give the sample standard deviation (see study/tables.py).

Conventions:
    arm "cnn"  the CNN (first) arm of CASS, or the CNN backbone of DINO / supervised training
    arm "vit"  the Transformer (second) arm
    label fractions as floats: 0.01, 0.1, 1.0

Notes on reading the text (kept here so the choices are visible):
  * Table 7's caption names the brain tumour MRI data set, but Appendix B.2 says Tables 7 and 8 are
    the autoimmune and brain MRI results "respectively", and Table 7's 100-epoch row equals Table 1's
    CASS 100% numbers (0.8650 / 0.8894). Table 7 is therefore taken as autoimmune.
  * Tables 12, 15 and 21 repeat the autoimmune CASS ResNet-50 + ViT-B/16 setting with slightly
    different printed values (0.8650 +- 0.001 in Table 12, 0.8680 +- 0.001 in Table 15); each table
    keeps its own printed numbers.
  * Figure 2 is a plot; the paper gives no numbers for it, only the "mean variance" over the settings
    in Sections 5.3.1-5.3.2 (FIGURE2_MEAN_VARIANCE).
  * Table 5 (ISIC 2019) reports balanced multi-class accuracy; every other table reports F1.
"""

# Data set of each table and the metric it reports (our name of the metric in metrics.json).
# Appendix D.1: F1 for autoimmune, Dermofit and brain MRI; balanced accuracy (recall) for ISIC 2019.
METRIC = {"autoimmune": "f1_macro", "dermofit": "f1_macro", "brain-mri": "f1_macro",
          "isic2019": "balanced_accuracy"}
METRIC_LABEL = {"f1_macro": "F1 (macro)", "balanced_accuracy": "balanced accuracy"}

# ---------------------------------------------------------------- Tables 1, 3, 4, 5
# MAIN[table] = {"data", "fracs", "cells": {(method, arm): {frac: (mean, spread)}}}
MAIN = {
    "table1": {
        "data": "autoimmune", "fracs": (0.1, 1.0),
        "title": "Autoimmune biopsy slides (198 images, multi-label): test F1",
        "cells": {
            ("dino", "cnn"): {0.1: (0.8237, 0.001), 1.0: (0.84252, 0.008)},
            ("cass", "cnn"): {0.1: (0.8158, 0.0055), 1.0: (0.8650, 0.0001)},
            ("supervised", "cnn"): {0.1: (0.819, 0.0216), 1.0: (0.83895, 0.007)},
            ("dino", "vit"): {0.1: (0.8445, 0.0008), 1.0: (0.8639, 0.002)},
            ("cass", "vit"): {0.1: (0.8717, 0.005), 1.0: (0.8894, 0.005)},
            ("supervised", "vit"): {0.1: (0.8356, 0.007), 1.0: (0.8420, 0.009)},
        },
    },
    "table3": {
        "data": "dermofit", "fracs": (0.1, 1.0),
        "title": "Dermofit (1,300 images, 10 classes): test F1",
        "cells": {
            ("dino", "cnn"): {0.1: (0.3749, 0.0011), 1.0: (0.6775, 0.0005)},
            ("cass", "cnn"): {0.1: (0.4367, 0.0002), 1.0: (0.7132, 0.0003)},
            ("supervised", "cnn"): {0.1: (0.33, 0.0001), 1.0: (0.6341, 0.0077)},
            ("dino", "vit"): {0.1: (0.332, 0.0002), 1.0: (0.4810, 0.0012)},
            ("cass", "vit"): {0.1: (0.3896, 0.0013), 1.0: (0.6667, 0.0002)},
            ("supervised", "vit"): {0.1: (0.299, 0.002), 1.0: (0.456, 0.0077)},
        },
    },
    "table4": {
        "data": "brain-mri", "fracs": (0.01, 0.1, 1.0),
        "title": "Brain tumour MRI (7,022 images, 4 classes): test F1",
        "cells": {
            ("dino", "cnn"): {0.01: (0.63405, 0.09), 0.1: (0.92325, 0.02819), 1.0: (0.9900, 0.0058)},
            ("cass", "cnn"): {0.01: (0.40816, 0.13), 0.1: (0.8925, 0.0254), 1.0: (0.9909, 0.0032)},
            ("supervised", "cnn"): {0.01: (0.52, 0.018), 0.1: (0.9022, 0.011), 1.0: (0.9899, 0.003)},
            ("dino", "vit"): {0.01: (0.3211, 0.071), 0.1: (0.7529, 0.044), 1.0: (0.8841, 0.0052)},
            ("cass", "vit"): {0.01: (0.3345, 0.11), 0.1: (0.7833, 0.0259), 1.0: (0.9279, 0.0213)},
            ("supervised", "vit"): {0.01: (0.3017, 0.077), 0.1: (0.747, 0.0245), 1.0: (0.8719, 0.017)},
        },
    },
    "table5": {
        "data": "isic2019", "fracs": (0.01, 0.1, 1.0),
        "title": "ISIC 2019 (25,331 images, 8 classes): test balanced multi-class accuracy",
        "cells": {
            ("dino", "cnn"): {0.01: (0.328, 0.0016), 0.1: (0.3797, 0.0027), 1.0: (0.493, 3.9e-05)},
            ("cass", "cnn"): {0.01: (0.3617, 0.0047), 0.1: (0.41, 0.0019), 1.0: (0.543, 2.85e-05)},
            ("supervised", "cnn"): {0.01: (0.2640, 0.031), 0.1: (0.3070, 0.0121), 1.0: (0.35, 0.006)},
            ("dino", "vit"): {0.01: (0.3676, 0.012), 0.1: (0.3998, 0.056), 1.0: (0.5408, 0.001)},
            ("cass", "vit"): {0.01: (0.3973, 0.0465), 0.1: (0.4395, 0.0179), 1.0: (0.5819, 0.0015)},
            ("supervised", "vit"): {0.01: (0.3074, 0.0005), 0.1: (0.3586, 0.0314), 1.0: (0.42, 0.007)},
        },
    },
}

# ---------------------------------------------------------------- Table 2: pretraining wall time
# 100 epochs on one RTX8000; DINO = training a CNN and a Transformer with DINO (two runs), CASS = one
# run that trains both. Seconds.
_H, _M = 3600, 60
TABLE2 = {
    "autoimmune": {"dino": 1 * _H + 13 * _M, "cass": 21 * _M},
    "dermofit": {"dino": 3 * _H + 9 * _M, "cass": 1 * _H + 11 * _M},
    "brain-mri": {"dino": 26 * _H + 21 * _M, "cass": 7 * _H + 11 * _M},
    "isic2019": {"dino": 109 * _H + 21 * _M, "cass": 29 * _H + 58 * _M},
}
TABLE2_NOTE = "100 epochs on a single NVIDIA RTX8000 (48 GB), 2 CPU cores"

# ---------------------------------------------------------------- ablations, Tables 6-21
# ABLATION[table] = {"data", "title", "rows": {row label: {"cnn": (m, s), "vit": (m, s)}}}
# (supervised-only tables 13 and 16 have a single value per row under "value").
_R50_VITB_BRAIN = {"cnn": (0.9909, 0.0032), "vit": (0.9279, 0.0213)}
_R50_VITB_AUTO = {"cnn": (0.8650, 0.0001), "vit": (0.8894, 0.005)}

ABLATION = {
    "table6": {"data": "brain-mri", "title": "CASS pretraining batch size (brain MRI, 100% labels)", "rows": {
        "8": {"cnn": (0.9895, 0.0025), "vit": (0.9198, 0.0109)},
        "16": _R50_VITB_BRAIN,
        "32": {"cnn": (0.991, 0.011), "vit": (0.9316, 0.006)}}},
    "table7": {"data": "autoimmune", "title": "CASS pretraining epochs (autoimmune, 100% labels)", "rows": {
        "50": {"cnn": (0.8521, 0.0007), "vit": (0.8765, 0.0021)},
        "100": {"cnn": (0.8650, 0.0001), "vit": (0.8894, 0.005)},
        "200": {"cnn": (0.8766, 0.001), "vit": (0.9053, 0.008)},
        "300": {"cnn": (0.8777, 0.004), "vit": (0.9091, 8.2e-5)}}},
    "table8": {"data": "brain-mri", "title": "CASS pretraining epochs (brain MRI, 100% labels)", "rows": {
        "50": {"cnn": (0.9795, 0.0109), "vit": (0.9262, 0.0181)},
        "100": _R50_VITB_BRAIN,
        "200": {"cnn": (0.9864, 0.008), "vit": (0.9476, 0.0012)},
        "300": {"cnn": (0.9920, 0.001), "vit": (0.9484, 0.017)}}},
    "table9": {"data": "autoimmune", "title": "CASS augmentation sets (autoimmune, 100% labels)", "rows": {
        "CASS only": _R50_VITB_AUTO,
        "CASS + Solarize": {"cnn": (0.8551, 0.0004), "vit": (0.81455, 0.002)},
        "CASS + Gaussian blur": {"cnn": (0.864, 4.2e-05), "vit": (0.8604, 0.0029)},
        "CASS + Gaussian blur + Solarize": {"cnn": (0.8573, 2.59e-05), "vit": (0.8513, 0.0066)}}},
    "table10": {"data": "autoimmune", "title": "Optimiser of the CNN arm (autoimmune, 100% labels)", "rows": {
        "Adam": _R50_VITB_AUTO,
        "SGD": {"cnn": (0.8648, 0.0005), "vit": (0.82355, 0.0064)}}},
    "table11": {"data": "autoimmune",
                "title": "Activation on the logits before the CASS loss (autoimmune, 100% labels)",
                "rows": {
                    "Without Sigmoid or Softmax": _R50_VITB_AUTO,
                    "With Sigmoid Layer": {"cnn": (0.8296, 0.00024), "vit": (0.8322, 0.004)},
                    "With Softmax Layer": {"cnn": (0.8188, 0.0001), "vit": (0.8093, 0.00011)}}},
    "table12": {"data": "autoimmune", "title": "Transformer arm, CNN ResNet-50 (autoimmune, 100% labels)", "rows": {
        "ViT Base/16": {"cnn": (0.8650, 0.001), "vit": (0.8894, 0.005)},
        "ViT Large/16": {"cnn": (0.8481, 0.001), "vit": (0.853, 0.004)}}},
    "table13": {"data": "autoimmune", "title": "Supervised ResNet-50 and ViT family (autoimmune, 100% labels)",
                "rows": {
        "ResNet-50": {"value": (0.83895, 0.007)},
        "ViT Base/16": {"value": (0.8420, 0.009)},
        "ViT Large/16": {"value": (0.80495, 0.0077)}}},
    "table14": {"data": "brain-mri", "title": "Transformer arm, CNN ResNet-50 (brain MRI, 100% labels)", "rows": {
        "DeiT Base/16": {"cnn": (0.9902, 0.0025), "vit": (0.9844, 0.0048)},
        "ViT Base/16": _R50_VITB_BRAIN,
        "ViT Large/16": {"cnn": (0.98945, 2.45e-5), "vit": (0.8896, 0.0009)}}},
    "table15": {"data": "autoimmune", "title": "CNN arm, Transformer ViT-B/16 (autoimmune, 100% labels)", "rows": {
        "ResNet-18": {"cnn": (0.8674, 4.8e-5), "vit": (0.8773, 5.29e-5)},
        "ResNet-50": {"cnn": (0.8680, 0.001), "vit": (0.8894, 0.0005)},
        "ResNet-200": {"cnn": (0.8517, 0.0009), "vit": (0.874, 0.0006)}}},
    "table16": {"data": "autoimmune", "title": "Supervised ResNet family (autoimmune, 100% labels)", "rows": {
        "ResNet-18": {"value": (0.8499, 0.0004)},
        "ResNet-50": {"value": (0.83895, 0.007)},
        "ResNet-200": {"value": (0.833, 0.0005)}}},
    "table17": {"data": "brain-mri", "title": "CNN arm, Transformer ViT-B/16 (brain MRI, 100% labels)", "rows": {
        "ResNet-18": {"cnn": (0.9913, 0.002), "vit": (0.9801, 0.007)},
        "ResNet-50": _R50_VITB_BRAIN,
        "ResNet-200": {"cnn": (0.9898, 0.005), "vit": (0.9276, 0.017)}}},
    "table18": {"data": "brain-mri", "title": "CNN in both arms: ResNet-50 + DenseNet-161 (brain MRI, 100% labels)",
                "rows": {
                    "ResNet-50 + ViT Base/16": _R50_VITB_BRAIN,
                    "ResNet-50 + DenseNet-161": {"cnn": (0.9743, 8.8e-5), "vit": (0.98365, 9.63e-5)}}},
    "table19": {"data": "brain-mri", "title": "Transformer in both arms: Swin + ViT-B/16 (brain MRI, 100% labels)",
                "rows": {
                    "ResNet-50 + ViT Base/16": _R50_VITB_BRAIN,
                    "Swin Transformer + ViT Base/16": {"cnn": (0.9883, 1.26e-5), "vit": (0.94, 8.12e-5)}}},
    "table20": {"data": "brain-mri", "title": "Initialisation of CASS (brain MRI, 100% labels)", "rows": {
        "Random": {"cnn": (0.9907, 0.009), "vit": (0.9116, 0.027)},
        "Imagenet": _R50_VITB_BRAIN}},
    "table21": {"data": "autoimmune", "title": "Initialisation of CASS (autoimmune, 100% labels)", "rows": {
        "Random": {"cnn": (0.8437, 0.0047), "vit": (0.8815, 0.048)},
        "Imagenet": _R50_VITB_AUTO}},
}

# ---------------------------------------------------------------- Figure 2 and headline claims
# "Mean variance" in performance over the settings of Figure 2 (autoimmune, 100% labels, ResNet-50
# and ViT-B/16), Sections 5.3.1 (epochs) and 5.3.2 (batch sizes 8, 16, 32).
FIGURE2_MEAN_VARIANCE = {"epochs": {"cass": 0.0001791, "dino": 0.0002265},
                         "batch_size": {"cass": 5.8432e-5, "dino": 0.00015003}}
FIGURE2_BATCH_SIZES = (8, 16, 32)
FIGURE2_EPOCHS = (50, 100, 200, 300)  # as Tables 7-8; the figure's own axis is not given in the text

HEADLINE_CLAIMS = {
    "gain_over_dino_1pct": 0.038, "gain_over_dino_10pct": 0.059, "gain_over_dino_100pct": 0.1013,
    "time_saved_vs_dino": 0.69,
}


def main_cell(table: str, method: str, arm: str, frac: float):
    """The paper's (mean, spread) of one cell of Tables 1, 3, 4, 5, or None."""
    return MAIN.get(table, {}).get("cells", {}).get((method, arm), {}).get(frac)


def ablation_cell(table: str, row: str, arm: str):
    """The paper's (mean, spread) of one cell of Tables 6-21 (arm 'cnn', 'vit' or 'value'), or None."""
    return ABLATION.get(table, {}).get("rows", {}).get(row, {}).get(arm)
