"""Evaluation metrics with their standard definitions (scikit-learn), shared by the trainers'
gate and ``chinwag eval`` so that both always compute the same numbers.
"""

from __future__ import annotations

import re
from collections import Counter
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


def roc_curves(
    y_true: Sequence[int] | np.ndarray, proba: np.ndarray, labels: Sequence[str]
) -> dict[str, dict[str, list[float]]]:
    """One-vs-rest ROC curve points per class present (for the report's plot)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true, dtype=int)
    out = {}
    for c, label in enumerate(labels):
        positives = (y == c).astype(int)
        if 0 < positives.sum() < len(y):
            fpr, tpr, _ = roc_curve(positives, np.asarray(proba)[:, c])
            out[label] = {"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist()}
    return out


def retrieval_metrics(ranks: Sequence[int | None], ks: Sequence[int] = (1, 3, 5, 10)) -> dict:
    """Recall@k and mean reciprocal rank from the 1-based rank of the first relevant result of
    each query (``None``: not retrieved). With one relevant item per query, recall@k is the
    share of queries whose item is in the top k."""
    n = len(ranks)
    found = [r for r in ranks if r is not None]
    return {
        "n": n,
        **{f"recall@{k}": (sum(1 for r in found if r <= k) / n if n else 0.0) for k in ks},
        "mrr": (sum(1.0 / r for r in found) / n) if n else 0.0,
    }


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, articles or extra whitespace."""
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token-level F1 between a prediction and a reference answer."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, reference: str) -> bool:
    """The normalised reference appears in the normalised prediction."""
    ref = normalize_answer(reference)
    return bool(ref) and ref in normalize_answer(prediction)


def abstention_metrics(abstained: Sequence[bool], should_abstain: Sequence[bool]) -> dict:
    """Precision and recall of abstaining, where abstaining is right on off-corpus questions."""
    tp = sum(a and s for a, s in zip(abstained, should_abstain, strict=True))
    fp = sum(a and not s for a, s in zip(abstained, should_abstain, strict=True))
    fn = sum(s and not a for a, s in zip(abstained, should_abstain, strict=True))
    return {
        "abstention_precision": tp / (tp + fp) if tp + fp else None,
        "abstention_recall": tp / (tp + fn) if tp + fn else None,
    }


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams over all n-grams, across the replies."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        toks = t.lower().split()
        grams.extend(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of a reply's word n-grams that repeat an earlier n-gram of the same reply."""
    toks = text.lower().split()
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100, linear interpolation), ``None`` for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None
