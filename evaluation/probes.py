"""Frozen-feature evaluations: a k-nearest-neighbour vote and a linear probe on pooled backbone
features (finetune.py --eval knn / linear; the k-NN vote is also the online monitor of the
pretraining runs, evaluation/monitors.py)."""

import numpy as np


def knn_probs(train_feats, train_y, test_feats, k, num_classes, multilabel):
    """Cosine k-nearest-neighbour vote (scikit-learn NearestNeighbors, brute force): the score of a
    class is the fraction of the k neighbours that have it; single-label predicts the largest
    (ties: the lowest class index), multi-label thresholds each label's fraction (label averaging)."""
    from sklearn.neighbors import NearestNeighbors
    nn_ = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train_feats)
    _, idx = nn_.kneighbors(test_feats)
    onehot = train_y.astype(np.float64) if multilabel else np.eye(num_classes)[train_y.astype(int)]
    return onehot[idx].mean(1)


def linear_probs(train_feats, train_y, test_feats, num_classes, multilabel, c, seed):
    """Logistic regression (L-BFGS, L2 with inverse strength c) on standardised features; one binary
    regression per label for multi-label (a label constant in the labelled set gets that constant)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(train_feats)
    a, b = scaler.transform(train_feats), scaler.transform(test_feats)
    make = lambda: LogisticRegression(C=c, max_iter=2000, random_state=seed)  # noqa: E731
    if not multilabel:
        y = train_y.astype(int)
        probs = np.zeros((len(b), num_classes))
        if len(np.unique(y)) == 1:
            probs[:, y[0]] = 1.0
            return probs
        clf = make().fit(a, y)
        probs[:, clf.classes_] = clf.predict_proba(b)
        return probs
    probs = np.zeros((len(b), num_classes))
    for j in range(num_classes):
        yj = (train_y[:, j] > 0.5).astype(int)
        probs[:, j] = make().fit(a, yj).predict_proba(b)[:, 1] if 0 < yj.sum() < len(yj) else float(yj[0])
    return probs
