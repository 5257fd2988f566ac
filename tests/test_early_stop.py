"""train.early_stop: a stage ends after `patience` epochs without a better validation accuracy,
records where, and stops at the same epoch when it is interrupted and resumed. And paired
students keep one plan."""
import json
from dataclasses import asdict

import pytest

from src.distillation import stage as stage_mod
from src.distillation.chain import run_chain
from src.distillation.engine import StopRequested
from src.utils.logger import read_epoch_csv
from tests.conftest import tiny_cfg

# validation accuracy the stage is told after each epoch: best at epoch 2, never beaten by 2 more
SCRIPT = {1: 0.5, 2: 0.6, 3: 0.55, 4: 0.6, 5: 0.9, 6: 0.95, 7: 0.97, 8: 0.99}
PATIENCE = 2


def expected_stop(script: dict, patience: int, epochs: int):
    """Recomputed here: the first epoch with `patience` epochs since the best (strictly higher) one."""
    best, best_epoch = -1.0, 0
    for e in range(1, epochs + 1):
        if script[e] > best:
            best, best_epoch = script[e], e
        if e - best_epoch >= patience and e < epochs:
            return e, best_epoch
    return None, best_epoch


@pytest.fixture
def scripted(monkeypatch):
    real = stage_mod.save_epoch

    def save_epoch(run, epoch, val, row, terms):
        return real(run, epoch, {**val, "accuracy": SCRIPT[epoch]}, row, terms)
    monkeypatch.setattr(stage_mod, "save_epoch", save_epoch)


def _stage(run, name):
    return json.loads((run / name / "stage.json").read_text())


def test_early_stop_ends_the_stage_where_the_validation_curve_says(tmp_path, scripted):
    cfg = tiny_cfg(train__epochs=8, train__early_stop=PATIENCE)
    run_chain(cfg, tmp_path / "run", progress=False)
    stop, best = expected_stop(SCRIPT, PATIENCE, 8)
    assert (stop, best) == (4, 2)
    for name in ("teacher", "student"):
        s = _stage(tmp_path / "run", name)
        assert (s["stopped_early_at"], s["best_epoch"], s["epochs"], s["planned_epochs"]) == (stop, best, stop, 8)
        assert s["early_stop_patience"] == PATIENCE
        assert len(read_epoch_csv(tmp_path / "run" / name / "epoch_log.csv")) == stop
    summary = (tmp_path / "run" / "summary.csv").read_text().splitlines()
    assert "stopped_early_at" in summary[0] and "planned_epochs" in summary[0]


def test_off_by_default_and_a_stage_that_keeps_improving_runs_every_epoch(tmp_path, scripted):
    run_chain(tiny_cfg(train__epochs=3), tmp_path / "off", progress=False)
    assert _stage(tmp_path / "off", "student")["stopped_early_at"] is None
    assert _stage(tmp_path / "off", "student")["epochs"] == 3


def test_a_stopped_and_resumed_stage_stops_at_the_same_epoch(tmp_path, scripted, monkeypatch):
    cfg = tiny_cfg(train__epochs=8, train__early_stop=PATIENCE)
    run_chain(cfg, tmp_path / "full", progress=False)

    def after_teacher_epoch_3():  # Ctrl-C at the end of the teacher's epoch 3
        log = tmp_path / "cut" / "teacher" / "epoch_log.csv"
        return log.exists() and len(read_epoch_csv(log)) == 3
    with pytest.raises(StopRequested):
        run_chain(cfg, tmp_path / "cut", progress=False, should_stop=after_teacher_epoch_3)
    # a kill after the student's early stop but before its stage.json: resumed, it trains no more epochs
    real = stage_mod.summarise

    def killed_before_student_summary(run, *a, **k):
        if run.stage.name == "student":
            raise RuntimeError("killed")
        return real(run, *a, **k)
    monkeypatch.setattr(stage_mod, "summarise", killed_before_student_summary)
    with pytest.raises(RuntimeError, match="killed"):
        run_chain(cfg, tmp_path / "cut", resume=True, progress=False)
    monkeypatch.setattr(stage_mod, "summarise", real)
    run_chain(cfg, tmp_path / "cut", resume=True, progress=False)
    for name in ("teacher", "student"):
        full, cut = _stage(tmp_path / "full", name), _stage(tmp_path / "cut", name)
        keys = ("stopped_early_at", "best_epoch", "epochs")
        assert [cut[k] for k in keys] == [full[k] for k in keys] == [4, 2, 4]
        assert len(read_epoch_csv(tmp_path / "cut" / name / "epoch_log.csv")) == 4


def test_early_stop_is_checked_as_a_config_value():
    from src.utils.errors import ConfigError
    with pytest.raises(ConfigError, match="train.early_stop"):
        tiny_cfg(train__early_stop=-1)


def test_paired_students_keep_the_plan_of_the_first_planned(tmp_path, monkeypatch):
    """Two plans would come out of two probes (a restart re-probes): the second paired student
    gets the first one's, also on resume; a stage of another model gets its own."""
    from types import SimpleNamespace

    from src.distillation import chain as chain_mod
    from src.distillation.chain import stage_plan
    from src.spec.sweep import with_baselines
    from src.distillation.stage import StagePlan
    from src.runs.runfolder import RunFolder
    cfg = with_baselines(tiny_cfg())
    cfg.stages[0].model = "resnet14t"  # the teacher: another model, its own plan
    probes = iter([StagePlan(epochs=2, batch_size=32, micro_batch=m) for m in (8, 16, 4)])
    monkeypatch.setattr(chain_mod, "plan_stage", lambda *a, **k: next(probes))
    (tmp_path / "run").mkdir()
    chain = SimpleNamespace(cfg=cfg, plans={}, folder=RunFolder(tmp_path / "run"), timings={"planning": 0.0},
                            data=SimpleNamespace(train=list(range(64)), num_classes=10), device="cpu")
    plans = {s.name: stage_plan(chain, s, resuming=False) for s in cfg.stages}
    assert plans["teacher"].micro_batch == 8 and plans["student"].micro_batch == 16
    assert plans["student_scratch"].micro_batch == plans["student_kd"].micro_batch == 16
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert {n: p["micro_batch"] for n, p in saved.items()} == {"teacher": 8, "student": 16, "student_scratch": 16,
                                                               "student_kd": 16}
    # a restart: the students not started yet are planned again and keep the first student's plan
    chain.plans = {"teacher": saved["teacher"], "student": saved["student"]}
    assert stage_plan(chain, cfg.stage("student_kd"), resuming=False).micro_batch == 16
    assert asdict(stage_plan(chain, cfg.stage("student"), resuming=True))["micro_batch"] == 16
