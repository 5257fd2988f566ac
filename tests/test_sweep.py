"""Ask the TAKD question in one command: sweeps, longer paths, dense guidance, and the report's answer."""
import json

import pandas as pd
import pytest
import torch

from src.distillation.chain import run_chain
from src.distillation.engine import StopRequested
from src.spec.sweep import parse_assistants
from src.analysis.report import write_report
from src.utils.checkpoint import read_weights
from src.utils.errors import ConfigError
from tests.conftest import tiny_cfg

CHAIN = [{"name": "teacher", "model": "cifar_resnet20", "role": "teacher"},
         {"name": "assistant", "model": "cifar_resnet14", "role": "assistant", "teacher": "teacher", "drop_path": 0.0},
         {"name": "student", "model": "cifar_resnet8", "role": "student", "teacher": "assistant", "lr": 0.004}]
SMALL = {"model": "cifar_resnet8", "name": "narrow"}


def _sweep_cfg(epochs=1, **over):
    return tiny_cfg(stages=CHAIN, sweep={"assistants": ["cifar_resnet14", SMALL, ["cifar_resnet14", SMALL]]},
                    train__epochs=epochs, **over)


def test_a_sweep_expands_into_the_expected_stages():
    cfg = _sweep_cfg()
    got = {s.name: (s.model, s.teachers) for s in cfg.stages}
    assert got == {
        "teacher": ("cifar_resnet20", []),
        "ta_cifar_resnet14": ("cifar_resnet14", ["teacher"]),
        "ta_narrow": ("cifar_resnet8", ["teacher"]),
        "ta_cifar_resnet14_narrow": ("cifar_resnet8", ["ta_cifar_resnet14"]),    # the second step of the longer path
        "student_via_cifar_resnet14": ("cifar_resnet8", ["ta_cifar_resnet14"]),
        "student_via_narrow": ("cifar_resnet8", ["ta_narrow"]),
        "student_via_cifar_resnet14_narrow": ("cifar_resnet8", ["ta_cifar_resnet14_narrow"]),  # teacher -> A1 -> A2 -> student
        "student_scratch": ("cifar_resnet8", []),
        "student_kd": ("cifar_resnet8", ["teacher"]),
    }
    assert all(s.role == "assistant" for s in cfg.stages if s.name.startswith("ta_"))
    students = [s for s in cfg.stages if s.name.startswith("student")]
    assert {s.seed_stream for s in students} == {"student"} and {s.role for s in students} == {"student"}
    assert all(s.lr == 0.004 for s in students)  # the chain student's own settings
    assert not cfg.sweep.assistants  # expanded: the saved config is the resolved chain


def test_assistants_on_the_command_line_and_bad_entries():
    assert parse_assistants("resnet34,resnet26,resnet34>resnet26") == ["resnet34", "resnet26", ["resnet34", "resnet26"]]
    with pytest.raises(ConfigError, match="empty entry"):
        parse_assistants("resnet34,,resnet26")
    with pytest.raises(ConfigError, match="unknown key"):
        tiny_cfg(stages=CHAIN, sweep={"assistants": [{"model": "cifar_resnet8", "teacher": "x"}]})
    with pytest.raises(ConfigError, match="listed twice"):
        tiny_cfg(stages=CHAIN, sweep={"assistants": ["cifar_resnet8", "cifar_resnet8"]})


def test_dense_guidance_teaches_every_stage_from_all_stages_above_it():
    cfg = tiny_cfg(stages=CHAIN, guidance="dense")
    assert [s.teachers for s in cfg.stages] == [[], ["teacher"], ["teacher", "assistant"]]
    again = tiny_cfg(stages=[{**s, "teacher": t.teacher} for s, t in zip(CHAIN, cfg.stages)], guidance="dense")
    assert [s.teachers for s in again.stages] == [s.teachers for s in cfg.stages]  # idempotent on a resolved chain


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    cfg = _sweep_cfg(kd__drop_teachers=1, guidance="single")
    # one dense stage beside the sweep: the direct-KD student's twin taught by the teacher and an assistant
    dense = [s for s in cfg.stages if s.name == "student_kd"][0]
    from dataclasses import replace
    cfg = replace(cfg, stages=[*cfg.stages, replace(dense, name="student_dense", teacher=["teacher", "ta_cifar_resnet14"])])
    run = tmp_path_factory.mktemp("sweep") / "run"
    run_chain(cfg, run, progress=False)
    return cfg, run


def _info(run, stage):
    return json.loads((run / stage / "stage.json").read_text())


def test_every_student_starts_from_the_same_weights_and_sees_the_same_batches(sweep_run):
    cfg, run = sweep_run
    students = [s.name for s in cfg.stages if s.name.startswith("student")]
    assert len(students) == 6
    infos = [_info(run, s) for s in students]
    assert len({i["init_weights_checksum"] for i in infos}) == 1 and len({i["data_seed"] for i in infos}) == 1
    assert len({i["recipe"] for i in infos}) == 1
    dense = _info(run, "student_dense")
    assert dense["teachers"] == ["teacher", "ta_cifar_resnet14"] and dense["method"] == "dense"
    assert dense["method_label"] == "dense from teacher + ta_cifar_resnet14, 1 dropped per batch"  # its own words
    trained = pd.read_csv(run / "summary.csv")
    assert (trained["model"] == "cifar_resnet20").sum() == 1  # the teacher is trained once, for every path


def test_the_report_answers_which_assistant_helps(sweep_run, tmp_path):
    cfg, run = sweep_run
    path = write_report([run], tmp_path / "report")
    text = path.read_text()
    assert "## Which assistant helps?" in text
    assert (tmp_path / "report" / "figures" / "tiny_accuracy_vs_assistant.png").stat().st_size > 10_000
    section = text.split("## Which assistant helps?")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| path")]
    taught = {"cifar_resnet14", "cifar_resnet8", "cifar_resnet14 → cifar_resnet8", "dense: teacher + ta_cifar_resnet14"}
    assert len(rows) == 4 and {r.split(" | ")[0][2:] for r in rows} == taught  # one row per taught student
    assert "after Holm's correction" in section
    diffs = pd.read_csv(tmp_path / "report" / "report_differences.csv")
    n_students = 6
    assert len(diffs) == n_students * (n_students - 1) // 2  # every pair, one seed
    assert diffs["p_holm"].ge(diffs["p_value"] - 1e-12).all()
    vs_kd = diffs[diffs["b"] == "student_kd"]
    assert set(vs_kd["a"]) == {"student_via_cifar_resnet14", "student_via_narrow", "student_via_cifar_resnet14_narrow",
                               "student_dense"}


def test_a_sweep_killed_in_its_middle_resumes_to_the_same_results(sweep_run, tmp_path):
    cfg, full = sweep_run
    calls = {"n": 0}
    target = tmp_path / "cut" / "student_dense"

    def stop_inside_the_dense_students_epoch():  # two steps in: the epoch is saved part-way
        if target.exists():
            calls["n"] += 1
        return calls["n"] > 2
    with pytest.raises(StopRequested) as stopped:
        run_chain(cfg, tmp_path / "cut", progress=False, should_stop=stop_inside_the_dense_students_epoch)
    assert "student_dense: epoch 1 up to step" in stopped.value.saved
    run_chain(cfg, tmp_path / "cut", resume=True, progress=False)
    a = pd.read_csv(full / "summary.csv").set_index("stage")
    b = pd.read_csv(tmp_path / "cut" / "summary.csv").set_index("stage")
    pd.testing.assert_series_equal(a["test_accuracy"], b["test_accuracy"])
    for stage in a.index:
        wa, wb = read_weights(full / stage / "best.pt"), read_weights(tmp_path / "cut" / stage / "best.pt")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), stage
    assert (full / "student_dense" / "schedule.csv").read_text() == (tmp_path / "cut" / "student_dense" / "schedule.csv").read_text()


def test_evaluate_and_load_model_on_a_sweep_finished_or_not(sweep_run, tmp_path, capsys):
    """The default stage is the chain's final student; a miss lists the stages; an interrupted
    stage is marked unfinished; a stage never started is one line; the report says how to resume."""
    import shutil

    from src.evaluate import main as evaluate
    from src.inference import load_model
    from src.analysis.report import main as report
    cfg, full = sweep_run
    assert load_model(full).stage == "student_dense" and load_model(full).finished
    run = tmp_path / "run"
    shutil.copytree(full, run)
    assert evaluate([str(run), "--device", "cpu"]) == 0
    metrics = json.loads((run / "evaluations" / "student_dense-test-digits" / "metrics.json").read_text())
    assert metrics["stage"] == "student_dense" and metrics["stage_finished"] is True
    assert evaluate([str(run), "--stage", "student", "--device", "cpu"]) == 2
    assert "its stages: teacher, ta_cifar_resnet14" in capsys.readouterr().err
    (run / "student_dense" / "stage.json").unlink()  # interrupted: best.pt of an epoch so far, no stage.json
    (run / "summary.csv").unlink()
    assert evaluate([str(run), "--stage", "student_dense", "--device", "cpu"]) == 0
    assert "UNFINISHED" in capsys.readouterr().out
    metrics = json.loads((run / "evaluations" / "student_dense-test-digits" / "metrics.json").read_text())
    assert metrics["stage_finished"] is False and "interrupted" in metrics["note"]
    (run / "student_kd" / "best.pt").unlink()  # never finished an epoch
    assert evaluate([str(run), "--stage", "student_kd", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no trained weights yet" in err and f"--resume {run}" in err
    assert report([str(run)]) == 2
    assert f"train_cnn.sh --resume {run}" in capsys.readouterr().err
