"""What a reviewer checks: paired students, seed streams, label smoothing of teachers, the logged LR."""
import json

import numpy as np
import pytest

from src.distillation.chain import _heaviest_teachers, _plan_key, run_chain
from src.spec.sweep import with_baselines
from src.distillation.recipe import lr_schedule
from src.utils.logger import TERMS_COLUMNS, read_epoch_csv
from src.utils.reproducibility import derive_seed
from tests.conftest import tiny_cfg

THREE = [{"name": "teacher", "model": "resnet10t", "role": "teacher"},
         {"name": "assistant", "model": "resnet10t", "role": "assistant", "teacher": "teacher"},
         {"name": "student", "model": "resnet10t", "role": "student", "teacher": "assistant"}]


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    cfg = with_baselines(tiny_cfg(stages=THREE, train__epochs=2, train__label_smoothing=0.1,
                                  train__warmup_epochs=0.5))
    run = tmp_path_factory.mktemp("research") / "run"
    run_chain(cfg, run, progress=False)
    return cfg, run


def _stage(run, name):
    return json.loads((run / name / "stage.json").read_text())


def test_the_three_students_start_from_the_same_weights_and_see_the_same_data(baseline_run):
    _, run = baseline_run
    students = [_stage(run, n) for n in ("student", "student_scratch", "student_kd")]
    assert len({s["init_weights_checksum"] for s in students}) == 1
    assert len({s["data_seed"] for s in students}) == 1
    others = [_stage(run, n) for n in ("teacher", "assistant")]
    assert len({s["init_weights_checksum"] for s in others} | {students[0]["init_weights_checksum"]}) == 3


def test_seed_streams_do_not_collide_across_seeds_and_stages():
    """With seed + index, seed s of stage i drew what seed s+1 of stage i-1 drew."""
    names = ["teacher", "assistant", "student"]
    draws = {(s, n): derive_seed(s, f"{n}/data") for s in range(5) for n in names}
    assert len(set(draws.values())) == len(draws)


def test_a_stage_that_teaches_trains_without_label_smoothing(baseline_run):
    cfg, run = baseline_run
    smoothing = {n: _stage(run, n)["label_smoothing"] for n in ("teacher", "assistant", "student", "student_scratch",
                                                               "student_kd")}
    assert smoothing == {"teacher": 0.0, "assistant": 0.0, "student": 0.1, "student_scratch": 0.1, "student_kd": 0.1}
    own = tiny_cfg(stages=[{**THREE[0], "label_smoothing": 0.2}, THREE[1]])
    assert own.label_smoothing(own.stages[0]) == 0.2  # configurable per stage


def test_learning_rate_column_is_what_the_epoch_used(baseline_run):
    cfg, run = baseline_run
    rows = read_epoch_csv(run / "teacher" / "epoch_log.csv")
    terms = read_epoch_csv(run / "teacher" / "epoch_terms.csv", TERMS_COLUMNS)
    steps = int(terms[0]["steps"])
    lr = _stage(run, "teacher")["lr"]
    per_step = lr_schedule(lr, cfg.train, 2, steps)
    for e, (row, term) in enumerate(zip(rows, terms)):
        used = per_step[e * steps:(e + 1) * steps]
        assert row["learning_rate"] == pytest.approx(np.mean(used), rel=1e-6)
        assert term["lr_first"] == pytest.approx(used[0]) and term["lr_last"] == pytest.approx(used[-1])
    assert rows[-1]["learning_rate"] > per_step[-1]  # not the floor after the last scheduler step


def test_epoch_terms_add_up_to_the_logged_objective(baseline_run):
    _, run = baseline_run
    for stage in ("assistant", "student_scratch"):
        rows = read_epoch_csv(run / stage / "epoch_log.csv")
        terms = read_epoch_csv(run / stage / "epoch_terms.csv", TERMS_COLUMNS)
        for row, t in zip(rows, terms):
            if np.isnan(t["train_kd"]):  # no teacher: the objective is the CE
                assert row["train_loss"] == pytest.approx(t["train_ce"], rel=1e-6)
            else:
                a = t["alpha"]
                assert row["train_loss"] == pytest.approx((1 - a) * t["train_ce"] + a * t["train_kd"], rel=1e-5)


def test_student_variants_share_one_plan_probed_with_the_heaviest_teacher():
    cfg = with_baselines(tiny_cfg(stages=[{"name": "teacher", "model": "resnet50", "role": "teacher"},
                                          {"name": "assistant", "model": "resnet34", "teacher": "teacher"},
                                          {"name": "student", "model": "resnet18", "teacher": "assistant"}]))
    keys = {_plan_key(cfg, cfg.stage(n)) for n in ("student", "student_scratch", "student_kd")}
    assert len(keys) == 1
    assert _heaviest_teachers(cfg, cfg.stage("student"), 10).teachers == ["teacher"]  # ResNet-50, not the assistant
