"""A search (--tune, --trials, --tune-each) on Optuna: trials are stage jobs, the test split is never
opened, the best values are frozen into the config beside the declared stage, a stopped search
resumes without repeating a finished trial, and bad input is one line with nothing written."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT

optuna = pytest.importorskip("optuna")

CONFIG = """name: tiny_tune
seed: 0
deterministic: true
data: {source: digits, image_size: 16, max_train_samples: 400, max_test_samples: 60, augment: none}
train: {epochs: 3, batch_size: 32, lr: 0.003, device: cpu}
stages:
  - {name: teacher, model: plain_cnn4, role: teacher, epochs: 4}
  - {name: student, model: plain_cnn2, role: student, teacher: teacher}
"""
TUNE = ["--tune", "kd.temperature=1:8:log,kd.alpha=0.1:0.9"]


def run(config: Path, out: Path, *extra, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "cnn_distillation.train_cnn", "--no-progress", "--threads", "1",
                           "--config", str(config), "--output-dir", str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def study(out: Path, name: str = "student"):
    from src.distillation.trial import open_storage
    return optuna.load_study(study_name=name, storage=open_storage(str(out / "tune" / "study.journal")))


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tune") / "tiny.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def tuned(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "run"
    proc = run(config, out, *TUNE, "--trials", "4")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, proc.stdout + proc.stderr


def test_a_search_freezes_its_best_values_and_trains_them_beside_the_declared_stage(tuned):
    out, text = tuned
    s = study(out)
    states = [t.state.name for t in s.trials]
    assert len(states) == 4 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    rec = cfg["tuned"]["student_tuned"]
    assert rec["from"] == "student" and rec["trials"] == 4 and rec["best_trial"] == s.best_trial.number
    assert rec["values"] == pytest.approx(s.best_trial.params) and rec["seed"] == 0
    assert 1 <= rec["values"]["kd.temperature"] <= 8 and 0.1 <= rec["values"]["kd.alpha"] <= 0.9
    stage = next(st for st in cfg["stages"] if st["name"] == "student_tuned")
    assert stage["method_args"] == {"temperature": rec["values"]["kd.temperature"], "kd_alpha": rec["values"]["kd.alpha"]}
    assert stage["teacher"] == "teacher" and stage["seed_stream"] in (None, "student")
    # the tuned student trained once, with its constant KD weight, and was tested
    terms = np.genfromtxt(out / "student_tuned" / "epoch_terms.csv", delimiter=",", names=True)
    assert np.allclose(terms["alpha"], rec["values"]["kd.alpha"])
    summary = json.loads((out / "student_tuned" / "stage.json").read_text())
    assert summary["test_accuracy"] == summary["test_accuracy"]  # tested: not NaN
    # the trials' best validation accuracy is what the study was told
    trial = json.loads((out / "tune" / "student" / f"trial_{s.best_trial.number}" / "student" / "stage.json").read_text())
    assert trial["val_accuracy"] == pytest.approx(s.best_value)
    # seed 0 is the trials' seed: the upstream teacher is the run's own teacher, bit for bit, and the tuned
    # student (the declared student's seed stream) retrains the best trial exactly
    up = json.loads((out / "tune" / "upstream" / "teacher" / "stage.json").read_text())
    assert up["rank_weight_checksums"] == json.loads((out / "teacher" / "stage.json").read_text())["rank_weight_checksums"]
    assert summary["rank_weight_checksums"] == trial["rank_weight_checksums"]
    report = (out / "report.md").read_text()
    assert "## Tuned on validation" in report and "student_tuned" in report
    assert any((out / "figures").glob("tune_*_history.png")) and any((out / "figures").glob("tune_*_importance.png"))


def test_a_moved_run_reports_its_search_from_its_own_journal(tuned, tmp_path):
    """The config records the journal's absolute path; a run folder moved since finds the journal in
    its own RUN/tune, and nothing is created at the recorded path."""
    import shutil
    out, _ = tuned
    moved = tmp_path / "moved"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("figures", "report*"))
    gone = tmp_path / "was_here" / "run"  # where the run lay when it was tuned
    cfg = moved / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(out), str(gone)))
    assert str(gone / "tune" / "study.journal") in cfg.read_text()
    proc = subprocess.run([sys.executable, "-m", "src.report", str(moved)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert any((moved / "figures").glob("tune_*_history.png"))
    assert not (tmp_path / "was_here").exists()
    # and with the journal gone too, the report still stands (without the search's figures), creating nothing
    shutil.rmtree(moved / "figures")
    (moved / "tune" / "study.journal").unlink()
    proc = subprocess.run([sys.executable, "-m", "src.report", str(moved)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "## Tuned on validation" in (moved / "report.md").read_text()
    assert not any((moved / "figures").glob("tune_*")) and not (tmp_path / "was_here").exists()
    assert not (moved / "tune" / "study.journal").exists()


def test_a_dry_run_names_the_search_and_the_most_it_adds(config, tmp_path):
    out = tmp_path / "run"
    proc = run(config, out, *TUNE, "--trials", "8", "--jobs", "2", "--dry-run")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "search before the plan above: student (kd.temperature=1:8:log, kd.alpha=0.1:0.9); 8 trials" in proc.stdout
    assert "the search adds about" in proc.stdout and "if no trial is pruned (2 trial(s) at a time" in proc.stdout
    assert not out.exists()
    # every trial to the end, two at a time, then the tuned student of each of three seeds
    from src.experiment.search import search_seconds
    from src.spec.config import load_config
    cfg = load_config(config, ["tune.knobs=kd.temperature=1:8", "tune.trials=8"])
    assert search_seconds(cfg, {"student": 10.0, "teacher": 99.0}, seeds=3, width=2) == pytest.approx(10.0 * (8 + 3) / 2)


def test_no_trial_reads_the_test_split(tuned):
    """Every trial's stage has no test metrics and no predictions; the upstream teacher neither."""
    out, _ = tuned
    stages = sorted((out / "tune").glob("*/trial_*/student")) + [out / "tune" / "upstream" / "teacher"]
    assert len(stages) == 5
    for st in stages:
        summary = json.loads((st / "stage.json").read_text())
        assert summary["test_accuracy"] != summary["test_accuracy"], st  # NaN: not read
        assert not (st / "predictions.csv").exists()
        assert yaml.safe_load((st.parent / "config.yaml").read_text())["data"]["read_test"] is False


def make_tree(root: Path, corrupt_test: bool) -> Path:
    """A tiny ImageFolder tree of 3 classes (coloured squares); its test/ holds an unreadable image."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 6)):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                px = np.clip(rng.normal(60 + 70 * c, 25, (12, 12, 3)), 0, 255).astype("uint8")
                Image.fromarray(px).save(d / f"{i}.png")
    if corrupt_test:
        (root / "test" / "c0" / "broken.png").write_bytes(b"not an image at all")
    return root


def test_the_search_never_opens_the_test_split(tmp_path):
    """The test folder holds an unreadable image: every trial finishes, and only the final training
    (which reads test once) stops on it."""
    tree = make_tree(tmp_path / "tree", corrupt_test=True)
    config = tmp_path / "tree.yaml"
    config.write_text(CONFIG.replace("source: digits,", f"source: imagefolder, root: {tree},")
                      .replace("max_train_samples: 400, max_test_samples: 60, ", ""))
    out = tmp_path / "run"
    proc = run(config, out, "--tune", "kd.temperature=1:8", "--trials", "2")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "broken.png" in text, text[-3000:]
    assert [t.state.name for t in study(out).trials] == ["COMPLETE", "COMPLETE"]


def test_a_killed_search_resumes_without_repeating_a_finished_trial(config, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "cnn_distillation.train_cnn", "--no-progress", "--threads", "1", "--config", str(config)]
    proc = subprocess.Popen(cmd + ["--output-dir", str(out), *TUNE, "--trials", "3"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal, t0 = out / "tune" / "study.journal", time.time()
    while time.time() - t0 < 400:  # one trial finished and the next one training: kill it all
        if journal.exists() and sum(t.state.name == "COMPLETE" for t in study(out).trials) >= 1 \
                and (out / "tune" / "student" / "trial_1" / "student" / "epoch_log.csv").exists():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = (out / "tune" / "student" / "trial_0" / "student" / "stage.json").read_text()
    resumed = subprocess.run(cmd + ["--resume", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    trials = study(out).trials
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert (out / "tune" / "student" / "trial_0" / "student" / "stage.json").read_text() == first  # not trained again
    assert not (out / "tune" / "student" / "trial_3").exists()
    assert (out / "student_tuned" / "stage.json").exists()


@pytest.mark.parametrize("extra, words", [
    (["--tune", "nosuch=1:2", "--trials", "2"], "unknown knob"),
    (["--tune", "kd.nosuch=1:2", "--trials", "2"], "nosuch"),
    (["--tune", "kd.temperature=5:1", "--trials", "2"], "above high"),
    (["--tune", "kd.temperature=0:4:log", "--trials", "2"], "log range"),
    (["--tune", "kd.temperature=1:4", "--trials", "0"], "--trials must be >= 1"),
    (["--tune", "data.max_test_samples=10:20", "--trials", "2"], "test split"),
    (["--tune", "kd.temperature=1:4", "--trials", "2", "--storage", "postgresql://nobody@127.0.0.1:9/none"], "--storage"),
    (["--tune", "kd.temperature=1:4", "--trials", "2", "--tune-each", "2"], "give only one"),
])
def test_bad_search_input_is_one_line_and_writes_nothing(config, tmp_path, extra, words):
    out = tmp_path / "run"
    proc = run(config, out, *extra, timeout=300)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and words in proc.stderr and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not out.exists()


def test_knobs_set_the_tuned_stage_only():
    from src.spec.config import StageConfig
    from src.spec.tune import parse_knobs, with_values
    knobs = parse_knobs("kd.temperature=1:20:log,kd.alpha=0.05:0.95,dkd.beta=1:8,train.lr=1e-4:1e-2:log")
    assert [k.log for k in knobs] == [True, False, False, True]
    st = with_values(StageConfig(name="s", model="m", teacher="t", method="dkd"),
                     {"kd.temperature": 3.0, "kd.alpha": 0.4, "dkd.beta": 2.0, "train.lr": 0.001})
    assert st.method_args == {"temperature": 3.0, "kd_alpha": 0.4, "beta": 2.0} and st.lr == 0.001


def test_a_stage_kd_alpha_is_constant_and_the_method_never_sees_it():
    from src.distillation.methods import build_method, kd_alpha
    from src.spec.config import StageConfig
    from tests.conftest import tiny_cfg
    cfg = tiny_cfg()
    st = StageConfig(name="s", model="plain_cnn2", teacher="teacher", method_args={"kd_alpha": 0.3, "temperature": 2.5})
    assert [kd_alpha(cfg, st, e, 5) for e in (1, 3, 5)] == [0.3, 0.3, 0.3]
    plain = StageConfig(name="p", model="plain_cnn2", teacher="teacher")
    assert kd_alpha(cfg, plain, 1, 5) == pytest.approx(cfg.kd.alpha_start)
    import torch
    m = build_method(cfg, st, [torch.nn.Identity()])
    assert m.temperature == 2.5


def test_the_median_pruner_leaves_every_trial_its_first_epoch():
    """Pruning starts once 4 trials finished, and never on a trial's first epoch (the noisiest)."""
    from src.distillation.trial import pruner
    study = optuna.create_study(direction="maximize", pruner=pruner())
    for _ in range(4):
        t = study.ask()
        for epoch in (1, 2, 3):
            t.report(0.9, epoch)
        study.tell(t, 0.9)
    low = study.ask()
    low.report(0.1, 1)
    assert not low.should_prune()  # epoch 1: kept, however low
    low.report(0.1, 2)
    assert low.should_prune()      # epoch 2 below the median of the finished trials: pruned
