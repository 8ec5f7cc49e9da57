"""Evaluation metrics with their standard definitions (scikit-learn), shared by the trainers'
gate and ``chinwag eval`` so that both always compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_report(
    y_true: Sequence[int] | np.ndarray, proba: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class and macro precision/recall/F1, one-vs-rest ROC-AUC, confusion matrix.

    ``proba`` is ``(n, len(labels))`` class probabilities; the prediction is the arg-max.
    ROC-AUC is ``None`` when the true labels hold fewer than two classes (undefined).
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba, dtype=float)
    pred = proba.argmax(axis=1) if len(proba) else np.zeros(0, dtype=int)
    index = list(range(len(labels)))
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=index, zero_division=0)
    auc: float | None
    present = sorted(set(y.tolist()))
    if len(present) < 2:
        auc = None
    elif len(labels) == 2:
        auc = float(roc_auc_score(y, proba[:, 1]))
    else:
        # Macro one-vs-rest over the classes present (an absent class has no ROC curve).
        aucs = [roc_auc_score((y == c).astype(int), proba[:, c]) for c in present]
        auc = float(np.mean(aucs))
    return {
        "n": len(y),
        "accuracy": float(accuracy_score(y, pred)) if len(y) else 0.0,
        "macro_precision": float(np.mean(p)),
        "macro_recall": float(np.mean(r)),
        "macro_f1": float(np.mean(f)),
        "roc_auc": auc,
        "per_class": {
            label: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion": confusion_matrix(y, pred, labels=index).tolist(),
        "labels": list(labels),
    }
