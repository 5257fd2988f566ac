"""End to end: the demo presets through the shell entry points, as a user runs them
(fewer samples and epochs than the full demo so the suite stays short)."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from src.distillation.chain import run_chain
from src.utils.checkpoint import safe_load
from src.utils.logger import REQUIRED_COLUMNS, read_epoch_csv
from tests.conftest import ROOT, run_cli, run_entry, tiny_cfg, validate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn") / "run"
    res = run_entry("cnn", "--config", ROOT / "cnn_distillation/configs/demo.yaml", "--output-dir", out,
                    "--epochs", 2, "--set", "data.max_train_samples=240", "--set", "data.max_test_samples=100",
                    cwd=out.parent)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return out, res


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """The ViT demo in this process (the shell entry point is the CNN demo's): what the console
    said is read from the project's logger."""
    import io
    import logging
    from types import SimpleNamespace

    from src.utils.logger import get_console, set_verbose
    out = tmp_path_factory.mktemp("vit") / "run"
    said = io.StringIO()
    handler = logging.StreamHandler(said)
    get_console().addHandler(handler)
    try:
        code, err = run_cli("vit", "--config", ROOT / "vit_distillation/configs/demo.yaml", "--output-dir", out,
                            "--epochs", 1, "--set", "data.max_train_samples=80", "--set", "data.max_test_samples=40",
                            "--verbose")
    finally:
        get_console().removeHandler(handler)
        set_verbose(False)
    assert code == 0, said.getvalue()[-2000:] + err[-2000:]
    return out, SimpleNamespace(stdout=said.getvalue(), stderr=err)


def _check_run_folder(out, models, epochs):
    assert (out / "config.yaml").is_file()
    env = json.loads((out / "env.json").read_text())
    from importlib import metadata
    assert env["packages"]["torch"] == metadata.version("torch")
    assert "commit" in env["git"] and env["reproducibility"]["seed"] == 42
    assert set(env["reproducibility"]) >= {"deterministic", "cudnn_deterministic", "cublas_workspace_config"}
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["model"]) == models
    for col in ("params", "val_accuracy", "test_accuracy", "test_f1_score", "peak_gpu_memory_mb", "train_seconds"):
        assert col in summary.columns and summary[col].notna().all()
    assert summary["params"].is_monotonic_decreasing
    for stage in ("teacher", "assistant", "student"):
        d = out / stage
        rows = read_epoch_csv(d / "epoch_log.csv")
        assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
        assert (d / "epoch_log.csv").read_text().splitlines()[0] == ",".join(REQUIRED_COLUMNS)
        best, last = safe_load(d / "best.pt"), safe_load(d / "last.pt")
        assert last["epoch"] == epochs and set(last) >= {"model", "optimizer", "scheduler", "rng"}
        assert 1 <= best["epoch"] <= epochs
        row = summary[summary["stage"] == stage].iloc[0]
        assert row["val_accuracy"] == pytest.approx(max(r["val_accuracy"] for r in rows), rel=1e-8)
    return summary


def test_cnn_demo_chain_produces_every_artefact(cnn_run):
    out, res = cnn_run
    _check_run_folder(out, ["resnet50", "resnet34", "resnet18"], 2)
    # a normal run: one line per epoch, one summary line per stage; the guards' spec messages need --verbose
    assert "Teacher frozen:" not in res.stdout and "Cleaning up training state" not in res.stdout
    summaries = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("→")]
    assert len(summaries) == 3 and all("memory released" in ln for ln in summaries)
    assert ["teacher frozen: yes" in ln for ln in summaries] == [False, True, True]
    epoch_lines = [ln for ln in res.stdout.splitlines() if " epoch " in ln and "/2 " in ln]
    assert len(epoch_lines) == 6 and sum("alpha" in ln for ln in epoch_lines) == 4  # alpha on KD stages only
    assert json.loads((out / "student" / "stage.json").read_text())["teacher"] == "assistant"


def test_vit_demo_chain_writes_attention_maps_and_checkpoints_vit_base(vit_run):
    out, res = vit_run
    _check_run_folder(out, ["vit_base_patch16_224", "vit_small_patch16_224", "vit_tiny_patch16_224"], 1)
    for stage in ("teacher", "assistant", "student"):
        pngs = list((out / stage / "attention").glob("*.png"))
        assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    assert "Gradient checkpointing enforced for vit_base_patch16_224" in res.stdout  # --verbose: spec messages
    assert "Teacher frozen: 85," in res.stdout and "Cleaning up training state" in res.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["teacher"]["grad_checkpointing"] is True and plan["student"]["grad_checkpointing"] is False


def test_validate_project_passes_on_runs_and_names_a_renamed_column(cnn_run, tmp_path, monkeypatch, capsys):
    import shutil
    out, _ = cnn_run
    ok = subprocess.run([sys.executable, str(ROOT / "validate_project.py"), "--runs", str(out.parent)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    assert "✓ All validations passed!" in ok.stdout
    broken = tmp_path / "runs" / "run"
    shutil.copytree(out, broken)
    csv = broken / "student" / "epoch_log.csv"
    csv.write_text(csv.read_text().replace("val_accuracy", "val_acc", 1))
    code, printed = validate(tmp_path / "runs", monkeypatch, capsys)
    assert code == 1
    assert "✗ epoch CSV schemas:" in printed and "val_accuracy" in printed


def test_entry_point_works_from_another_folder_and_refuses_to_overwrite(cnn_run):
    out, _ = cnn_run
    res = run_entry("cnn", "--config", ROOT / "cnn_distillation/configs/demo.yaml", "--output-dir", out, cwd="/")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: output folder") and "Traceback" not in res.stderr


def test_help_lists_the_options():
    res = subprocess.run(["bash", str(ROOT / "vit_distillation/train_vit.sh"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for opt in ("--config", "--output-dir", "--resume", "--baselines", "--seeds", "--set"):
        assert opt in res.stdout


def test_same_seed_same_losses(tmp_path):
    cfg = tiny_cfg()
    run_chain(cfg, tmp_path / "a", progress=False)
    run_chain(cfg, tmp_path / "b", progress=False)
    for stage in ("teacher", "student"):
        a = read_epoch_csv(tmp_path / "a" / stage / "epoch_log.csv")
        b = read_epoch_csv(tmp_path / "b" / stage / "epoch_log.csv")
        assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
        assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]


def test_help_texts_say_what_each_option_does(capsys):
    import re

    from src import evaluate, report
    res = subprocess.run(["bash", str(ROOT / "cnn_distillation/train_cnn.sh"), "--help"], capture_output=True, text=True)
    text = re.sub(r"\s+", " ", res.stdout)
    assert "torchrun --nproc_per_node N -m cnn_distillation.train_cnn" in text  # the module, not the .sh
    for opt in ("--seed SEED", "--data-source SOURCE", "--no-progress", "--verbose", "--tensorboard"):
        assert opt in text, opt
    assert re.search(r"--seed SEED run seed", text) and re.search(r"--data-source SOURCE where the images", text)
    for main in (report.main, evaluate.main):  # python -m src.report / src.evaluate: their main(), in this process
        with pytest.raises(SystemExit) as stop:
            main(["--help"])
        assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "RUN_DIR" in out and "seeds.json" in out and "--out" in out
    assert "--stage" in out and "--data-root" in out
