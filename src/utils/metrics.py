"""Classification metrics.

Macro averaging is used for precision, recall and F1 everywhere in this project: every class
counts equally regardless of how many samples it has, so a model cannot look good by doing
well on the frequent classes only. `average='macro'` is passed explicitly to scikit-learn.
The average runs over the classes present in the evaluated labels: a class with no image in
the split (a subsampled or partial tree) has no recall to speak of and would only pull F1
towards 0. A prediction of an absent class still counts against the recall of the image's class.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

AVERAGING = "macro"


def classification_metrics(y_true, y_pred, num_classes: int | None = None) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 for integer labels `y_true`, `y_pred`: [N],
    averaged over the classes present in `y_true` (`num_classes` is accepted for the callers and
    not needed: absent classes are left out of the average)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    labels = np.unique(y_true)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=AVERAGING, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1_score": float(f1),
    }


def normalized_confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Row-normalised confusion matrix [C, C]: row i is the distribution of predictions for class i."""
    return confusion_matrix(y_true, y_pred, labels=np.arange(num_classes), normalize="true")
