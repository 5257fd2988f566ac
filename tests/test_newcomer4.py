"""What a newcomer met, fourth round: corrupt weights, one default stage, demo detection from the
data, --gpus without a GPU, options that were silently ignored, data-path messages, the methods
table, the palette, and what clean.sh and a refused reproduction leave behind."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_cli, run_entry

SWEEP = """name: tiny_sweep
seed: 0
deterministic: true
data: {source: digits, image_size: 16, max_train_samples: 300, max_test_samples: 60, augment: none}
train: {epochs: 2, batch_size: 32, lr: 0.003, device: cpu}
sweep: {assistants: [plain_cnn4], baselines: true, methods: [dist, fitnet]}
stages:
  - {name: teacher, model: plain_cnn4, role: teacher, epochs: 3}
  - {name: student, model: plain_cnn2, role: student, teacher: teacher}
"""


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("n4")
    config = root / "sweep.yaml"
    config.write_text(SWEEP)
    out = root / "run"
    code, err = run_cli("cnn", "--config", config, "--output-dir", out, "--threads", "1")
    assert code == 0, err
    return out


def test_load_model_and_evaluate_default_to_the_same_stage_and_the_model_is_callable(sweep_run):
    import torch
    from src import load_model
    from src.inference import final_student
    from src.runs.runfolder import RunFolder
    loaded = load_model(sweep_run)  # the package's own entry: no "no stage 'student'" on a sweep
    assert loaded.stage == final_student(RunFolder(sweep_run).config()) == "student_via_plain_cnn4"
    out = subprocess.run([sys.executable, "-m", "src.evaluate", str(sweep_run)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (sweep_run / "evaluations").glob("student_via_plain_cnn4-test-*")
    assert any((sweep_run / "evaluations").glob("student_via_plain_cnn4-test-*"))
    x = torch.zeros(2, 3, 16, 16)
    assert loaded.eval().to("cpu")(x).shape == (2, 10)


def test_the_methods_table_leads_the_report_and_names_a_dominating_term(sweep_run):
    report = (sweep_run / "report.md").read_text()
    glance, tests = report.index("the methods at a glance"), report.index("## Does the assistant help?")
    assert glance < tests
    table = report[glance:tests]
    assert "| method | from the teacher | via ta_plain_cnn4 |" in table
    assert "| DIST |" in table and "| FITNET |" in table and "| KD |" in table and "(KD " in table
    import pandas as pd
    rows = pd.read_csv(sweep_run / "report_table.csv").set_index("stage")
    scratch = 100 * rows.loc["student_scratch", "test_accuracy_mean"]  # the student alone, not the teacher (also "scratch")
    assert f"| scratch | {scratch:.2f} [" in table
    # FitNets' hint weight of 100 against CE, measured from its terms (a two-epoch run: it sits far below scratch)
    from src.analysis.glance import dominant_term
    from src.runs.runfolder import RunFolder
    words = dominant_term(RunFolder(sweep_run), "student_fitnet", "fitnet")
    assert "its fitnet term (weight 100) was" in words and "x its cross-entropy" in words
    assert dominant_term(RunFolder(sweep_run), "student_kd", "kd") == ""  # KD's alpha mixes, nothing swamps


def test_every_stage_has_its_own_colour_and_the_takd_student_its_path(sweep_run, tmp_path, monkeypatch):
    import pandas as pd
    from src.visualization import plots
    seen = {}
    real = plots._band
    monkeypatch.setattr(plots, "_band", lambda ax, g, col, scale, style, label, n, color=None: (
        seen.__setitem__(label, color), real(ax, g, col, scale, style, label, n, color))[1])
    frame = pd.DataFrame({"epoch": [1, 2], "val_accuracy": [0.5, 0.6], "seed": [0, 0]})
    plots.training_curves({f"stage_{i}": frame for i in range(12)}, tmp_path / "c.png")
    assert len(seen) == 12 and len(set(seen.values())) == 12  # tab10 alone gave the 11th the 1st's blue
    from src.analysis.report import _curves_and_schedules, collect
    from src.runs.runfolder import RunFolder
    rows = collect([RunFolder(sweep_run)])
    curves, _, _ = _curves_and_schedules(rows, RunFolder(sweep_run), rows["seed"].iloc[0])
    assert "student_via_plain_cnn4 (plain_cnn2) ← ta_plain_cnn4" in curves


@pytest.mark.parametrize("target", ["evaluate", "load_model", "teacher", "validate"])
def test_a_truncated_model_safetensors_is_one_line_naming_the_file(tmp_path, target, monkeypatch, capsys):
    from tests.conftest import tiny_cfg  # noqa: F401
    config = tmp_path / "c.yaml"
    config.write_text(SWEEP.replace("sweep: {assistants: [plain_cnn4], baselines: true, methods: [dist, fitnet]}\n", ""))
    run = tmp_path / "runs" / "run"
    code, err = run_cli("cnn", "--config", config, "--output-dir", run, "--threads", "1")
    assert code == 0, err
    weights = run / "teacher" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # cut short
    if target == "evaluate":
        out = subprocess.run([sys.executable, "-m", "src.evaluate", str(run), "--stage", "teacher"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        code, text = out.returncode, out.stderr
    elif target == "load_model":
        from src import load_model
        from src.utils.errors import CheckpointError
        with pytest.raises(CheckpointError, match="model.safetensors: not readable weights"):
            load_model(run, "teacher")
        return
    elif target == "teacher":  # another run's checkpoint: as a frozen teacher
        raw = yaml.safe_load(config.read_text())
        raw["stages"][0]["checkpoint"] = str(weights)
        config.write_text(yaml.safe_dump(raw))
        code, text = run_cli("cnn", "--config", config, "--output-dir", tmp_path / "second", "--threads", "1")
        assert not (tmp_path / "second").exists()
    else:
        from tests.conftest import validate
        code, text = validate(tmp_path / "runs", monkeypatch, capsys)
        assert code != 0 and "model.safetensors" in text
        return
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "model.safetensors" in lines[0], text
    assert "Traceback" not in text


def test_gpus_without_a_gpu_and_options_that_would_be_ignored_are_refused(tmp_path):
    import torch
    if not torch.cuda.is_available():
        code, err = run_cli("cnn", "--gpus", "1", "--output-dir", tmp_path / "a")
        assert code == 2 and "needs CUDA GPUs" in err and not (tmp_path / "a").exists()
    code, err = run_cli("cnn", "--seeds", "0,1", "--seed", "3", "--output-dir", tmp_path / "b")
    assert code == 2 and "give only one" in err
    if not torch.cuda.is_available():  # a refused start: no --resume advice, nothing left behind
        code, err = run_cli("cnn", "--config", ROOT / "cnn_distillation" / "configs" / "demo.yaml", "--device", "cuda",
                            "--output-dir", tmp_path / "d")
        assert code == 2 and "--resume" not in err and not (tmp_path / "d").exists(), err
    res = run_entry("cnn", "--baseline", "--output-dir", tmp_path / "c", timeout=120)  # a typo, not --baselines
    assert res.returncode == 2 and "unrecognized arguments: --baseline" in res.stderr


def test_a_wrong_tarball_name_says_a_tar_gz_is_accepted_and_evaluate_checks_classes_first(tmp_path, image_tree):
    from src.data.sources import classes_of, load_dataset
    from src.spec.config import DataConfig
    from src.utils.errors import DataError
    with pytest.raises(DataError, match=r"\.tar\.gz"):
        load_dataset(DataConfig(source="imagefolder", root=str(tmp_path / "cifar10.tar.gz")))
    assert classes_of(DataConfig(source="imagefolder", root=str(image_tree))) == ["cat", "dog"]
    assert classes_of(DataConfig(source="digits")) == [str(i) for i in range(10)]


def test_clean_knows_a_reproduction_and_a_refused_reproduction_leaves_nothing(tmp_path):
    from src.runs.clean import is_run_folder, removal_problem
    repro = tmp_path / "takd_cpu"
    (repro / "configs").mkdir(parents=True)
    (repro / "configs" / "plain-cifar10-teachers.yaml").write_text("name: x\n")
    assert is_run_folder(repro) and removal_problem(repro) is None
    assert not is_run_folder(tmp_path)
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine does not refuse --device cuda")
    out = tmp_path / "x3"
    res = subprocess.run([sys.executable, "benchmarks/reproduce_takd.py", "--slice", "cpu", "--data-source", "digits",
                          "--epochs", "1", "--teacher-epochs", "1", "--seeds", "0", "--device", "cuda", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--resume" not in res.stderr, res.stderr[-2000:]
    assert not out.exists()


def test_the_stop_line_says_the_partial_epoch_is_saved():
    text = (ROOT / "src" / "experiment" / "session.py").read_text()
    assert "completed epochs are saved" not in text and "up to its last step" in text


def test_several_runs_compared_get_the_columns_a_researcher_sorts_by(sweep_run, tmp_path):
    from src.analysis.report import write_report
    path = write_report([sweep_run, sweep_run], tmp_path / "cmp")
    text = path.read_text()
    assert "## The runs compared" in text
    assert "| run | dataset | epochs | T | KD weight (alpha) | methods' weights | seeds | teacher acc (%) |" in text
    json.dumps(text)  # plain text
    assert Path(path).exists()


def test_a_chain_says_what_it_does_before_its_estimate(tmp_path):
    """Between the data line and the estimate a chain plans and times its stages (minutes for a
    ViT-Base on a CPU): it says so first, naming them."""
    config = tmp_path / "c.yaml"
    config.write_text(SWEEP.replace("sweep: {assistants: [plain_cnn4], baselines: true, methods: [dist, fitnet]}\n", ""))
    res = run_entry("cnn", "--config", config, "--output-dir", tmp_path / "run", "--threads", "1", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout
    assert text.index("Data: digits") < text.index("Planning 2 stages (teacher, student)") < text.index("Estimated training time")
