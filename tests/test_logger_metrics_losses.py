import csv
import math

import numpy as np
import pytest
import torch

from src.distillation.losses import kd_loss
from src.utils.logger import REQUIRED_COLUMNS, EpochLogger, SchemaError, read_epoch_csv
from src.utils.metrics import classification_metrics


def _row(epoch=1):
    return {c: (epoch if c == "epoch" else 0.5) for c in REQUIRED_COLUMNS}


def test_required_columns_exactly_as_spec():
    assert REQUIRED_COLUMNS == [
        'epoch', 'train_loss', 'train_accuracy', 'train_precision', 'train_recall', 'train_f1_score',
        'val_loss', 'val_accuracy', 'val_precision', 'val_recall', 'val_f1_score',
        'learning_rate', 'epoch_time_sec', 'gpu_memory_mb']


def test_row_is_on_disk_right_after_log(tmp_path):
    log = EpochLogger(tmp_path / "e.csv")
    log.log(_row(1))
    with open(tmp_path / "e.csv") as f:  # read by another handle: flushed already
        rows = list(csv.reader(f))
    assert rows[0] == REQUIRED_COLUMNS and rows[1][0] == "1"


@pytest.mark.parametrize("mutate", ["rename", "missing", "reorder", "extra"])
def test_bad_row_raises(tmp_path, mutate):
    log = EpochLogger(tmp_path / "e.csv")
    row = _row()
    if mutate == "rename":
        row = {("val_acc" if k == "val_accuracy" else k): v for k, v in row.items()}
    elif mutate == "missing":
        row.pop("gpu_memory_mb")
    elif mutate == "reorder":
        keys = list(row)
        keys[1], keys[2] = keys[2], keys[1]
        row = {k: row[k] for k in keys}
    else:
        row["extra"] = 1.0
    with pytest.raises(SchemaError):
        log.log(row)
    assert read_epoch_csv(tmp_path / "e.csv") == []


@pytest.mark.parametrize("mutate", ["rename", "missing", "reorder"])
def test_refuses_to_append_to_a_csv_with_another_header(tmp_path, mutate):
    header = list(REQUIRED_COLUMNS)
    if mutate == "rename":
        header[7] = "val_acc"
    elif mutate == "missing":
        header = header[:-1]
    else:
        header[1], header[2] = header[2], header[1]
    path = tmp_path / "e.csv"
    path.write_text(",".join(header) + "\n")
    before = path.read_text()
    with pytest.raises(SchemaError):
        EpochLogger(path)
    assert path.read_text() == before  # nothing overwritten


def test_resume_truncates_rows_after_the_checkpointed_epoch(tmp_path):
    log = EpochLogger(tmp_path / "e.csv")
    for e in (1, 2, 3):
        log.log(_row(e))
    EpochLogger(tmp_path / "e.csv", resume_from_epoch=2)
    assert [r["epoch"] for r in read_epoch_csv(tmp_path / "e.csv")] == [1, 2]


def test_macro_metrics_by_hand():
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1])
    # class 0: P=1, R=0.5, F1=2/3; class 1: P=2/3, R=1, F1=0.8 -> macro means
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1_score"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_kd_loss_against_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 2.5]])
    y = torch.tensor([1, 2])
    T, alpha = 4.0, 0.7
    sn, tn, = s.numpy().astype(np.float64), t.numpy().astype(np.float64)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    ce = -np.mean(np.log(softmax(sn)[np.arange(2), y.numpy()]))
    p_t, p_s = softmax(tn / T), softmax(sn / T)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s))) / 2  # summed over classes, mean over batch
    expected = (1 - alpha) * ce + alpha * T * T * kl
    out = kd_loss(s, y, t, alpha=alpha, temperature=T)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["task_loss"].item() == pytest.approx(ce, rel=1e-5)
    assert out["kd_loss"].item() == pytest.approx(T * T * kl, rel=1e-5)


def test_kd_loss_without_teacher_is_plain_cross_entropy():
    s = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    out = kd_loss(s, y, None, alpha=0.9)
    assert out["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item())
    assert out["kd_loss"].item() == 0


def test_kd_loss_zero_when_student_matches_teacher():
    s = torch.randn(3, 4)
    out = kd_loss(s, torch.tensor([0, 1, 2]), s.clone(), alpha=1.0)
    assert math.isclose(out["loss"].item(), 0.0, abs_tol=1e-6)


def test_macro_metrics_average_over_the_classes_present():
    """A split holding classes 0 and 1 of 4: classes 2 and 3 (absent) do not pull the average to 0;
    a prediction of absent class 3 still costs class 1 its recall."""
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 3], num_classes=4)
    # class 0: P=1, R=0.5, F1=2/3; class 1: P=1/2, R=1/2, F1=1/2
    assert m["precision"] == pytest.approx((1 + 0.5) / 2)
    assert m["recall"] == pytest.approx((0.5 + 0.5) / 2)
    assert m["f1_score"] == pytest.approx((2 / 3 + 0.5) / 2)
