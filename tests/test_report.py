"""The report: built from a small run made here; figures exist; every number matches the CSVs."""
import re
import struct

import numpy as np
import pandas as pd
import pytest
import yaml

from src.spec.config import to_dict
from src.analysis.report import fmt, write_report
from tests.conftest import run_cli, tiny_cfg

THREE = [{"name": "teacher", "model": "resnet10t", "role": "teacher"},
         {"name": "assistant", "model": "resnet10t", "role": "assistant", "teacher": "teacher"},
         {"name": "student", "model": "resnet10t", "role": "student", "teacher": "assistant"}]


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(tiny_cfg(stages=THREE, train__epochs=2))))
    code, err = run_cli("cnn", "--config", cfg, "--output-dir", tmp / "run", "--baselines", "--seeds", "0,1")
    assert code == 0, err
    return tmp / "run"


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert w > 100 and h > 100


def test_report_rows_methods_and_figures(seeded_run):
    text = (seeded_run / "report.md").read_text()
    for stage, role, method in (("teacher", "teacher", "SCRATCH"), ("assistant", "assistant", "KD"),
                                ("student", "student", "TAKD"), ("student_scratch", "student", "SCRATCH"),
                                ("student_kd", "student", "KD")):
        assert re.search(rf"\| {stage} \| resnet10t \| {role} \| {method} \|", text), stage
    assert "TAKD − KD" in text and "KD − scratch" in text and "Seeds: 0, 1" in text
    assert "Reporting protocol" in text
    assert "Pipeline check, not a result" in text  # digits: toy data, whatever the run is named
    figs = sorted((seeded_run / "figures").glob("*.png"))
    names = {p.name for p in figs}
    for expected in ("accuracy_vs_params.png", "accuracy_vs_flops.png", "methods.png", "tiny_curves.png",
                     "tiny_schedules.png", "tiny_confusion_student.png"):
        assert expected in names
    for p in figs:
        _png_ok(p)
        assert f"figures/{p.name}" in text


def test_every_number_in_the_report_matches_the_csvs(seeded_run):
    text = (seeded_run / "report.md").read_text()
    rows = {s: pd.read_csv(seeded_run / f"seed_{s}" / "summary.csv") for s in (0, 1)}
    for stage in ("teacher", "assistant", "student", "student_scratch", "student_kd"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| tiny | {stage} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        vals = pd.DataFrame([r[r["stage"] == stage].iloc[0] for r in rows.values()])
        assert cells[3] == vals["role"].iloc[0]
        assert cells[5] == f"{vals['params'].iloc[0] / 1e6:.2f}"
        assert cells[6] == f"{vals['flops'].iloc[0] / 1e9:.3f}"
        assert cells[7] == str(vals["batch_size"].iloc[0]) and cells[8] == "no"  # one plan, shown
        for i, col in zip([9, 10, 11, 13, 14, 15], ["val_accuracy", "last_val_accuracy", "test_accuracy", "test_precision",
                                                   "test_recall", "test_f1_score"]):
            v = vals[col].astype(float)
            assert cells[i] == fmt(v.mean(), v.std()), (stage, col)
        assert cells[16] == "n/a (CPU)"
        t = vals["train_seconds"].astype(float)
        assert cells[17] == fmt(t.mean(), t.std(), 1, 1)
    acc = {s: rows[s].set_index("stage")["test_accuracy"] for s in (0, 1)}
    d = np.array([acc[s]["student"] - acc[s]["student_kd"] for s in (0, 1)])
    assert f"| tiny | TAKD − KD | mean of 2 | {d.mean() * 100:+.2f} |" in text


def test_report_compares_two_runs(seeded_run, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(seeded_run / "seed_0", other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["name"] = "other"
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    path = write_report([seeded_run, other], tmp_path / "cmp")
    text = path.read_text()
    assert "| tiny | student |" in text and "| other | student |" in text
    _png_ok(tmp_path / "cmp" / "figures" / "methods.png")


def test_significance_per_seed_matches_the_predictions(seeded_run):
    """McNemar counts and p-values recomputed here from the two students' test predictions."""
    from scipy.stats import binomtest
    diffs = pd.read_csv(seeded_run / "report_differences.csv")
    row = diffs[(diffs["difference"] == "TAKD − KD") & (diffs["seed"] == "0")].iloc[0]
    a = pd.read_csv(seeded_run / "seed_0" / "student" / "test_predictions.csv")
    b = pd.read_csv(seeded_run / "seed_0" / "student_kd" / "test_predictions.csv")
    ca, cb = (a["y_true"] == a["y_pred"]).to_numpy(), (b["y_true"] == b["y_pred"]).to_numpy()
    only_a, only_b = int((ca & ~cb).sum()), int((~ca & cb).sum())
    assert (row["only_a"], row["only_b"]) == (only_a, only_b)
    expected_p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    assert row["p_value"] == pytest.approx(expected_p)
    assert row["low"] <= row["mean"] <= row["high"] and row["mean"] == pytest.approx(ca.mean() - cb.mean())
    text = (seeded_run / "report.md").read_text()
    verdicts = text.count("not significant") + text.count("| **significant**")
    assert verdicts >= 6  # every row says which it is


def test_report_cli_refuses_a_folder_that_is_not_a_run(tmp_path):
    from src.analysis.report import main
    assert main([str(tmp_path)]) == 2


def test_report_pairs_predictions_on_the_file_and_corrects_with_holm(seeded_run, tmp_path):
    """Rows of one student's predictions shuffled: the same tests (joined on the file id, not the
    row position); a label that differs for the same file is refused; p-values Holm-adjusted."""
    import shutil
    from src.analysis.report import collect, differences
    from src.utils.stats import holm
    run = tmp_path / "run"
    shutil.copytree(seeded_run, run)
    before = differences(collect([run]))
    path = run / "seed_0" / "student_kd" / "test_predictions.csv"
    df = pd.read_csv(path)
    df.sample(frac=1.0, random_state=1).to_csv(path, index=False)
    after = differences(collect([run]))
    pd.testing.assert_frame_equal(before, after)
    tested = after[after["p_value"].notna()]
    assert tested["p_holm"].tolist() == pytest.approx(holm(tested["p_value"]))
    assert (tested["significant"] == (tested["p_holm"] < 0.05)).all()
    # over seeds: t intervals at Bonferroni's level across the report's over-seed rows, recomputed here
    from scipy import stats
    over = after[after["seed"].astype(str).str.startswith("mean")]
    assert len(over)
    for _, r in over.iterrows():
        per_seed = after[(after["difference"] == r["difference"]) & (after["run"] == r["run"]) & after["p_value"].notna()]
        d = per_seed["mean"].to_numpy()
        half = stats.t.ppf(1 - 0.05 / (2 * len(over)), len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert (r["low"], r["high"]) == pytest.approx((d.mean() - half, d.mean() + half))
        assert r["level"] == pytest.approx(1 - 0.05 / len(over)) and r["family"] == len(over)
    from src.analysis.report import _diff_md
    assert f"Bonferroni over the {len(over)} over-seed comparisons of this report" in "\n".join(_diff_md(after))
    df.loc[0, "y_true"] = (df.loc[0, "y_true"] + 1) % 10
    df.to_csv(path, index=False)
    with pytest.raises(ValueError, match="different labels"):
        differences(collect([run]))


def test_the_demo_banner_follows_the_data_not_the_name():
    """A pipeline check is a run on toy data (digits), whatever its name: a digits run with swapped
    models and a preset-like name is one, a CIFAR run named demo is not."""
    from dataclasses import replace
    from src.spec.config import load_config
    from src.analysis.report import is_demo
    from tests.conftest import ROOT
    for preset in sorted(ROOT.glob("*_distillation/configs/*.yaml")):
        cfg = load_config(preset)
        assert is_demo(cfg) == (cfg.data.source == "digits"), preset
    assert is_demo(tiny_cfg(name="cnn_demo-cifar_resnet20-cifar_resnet8")) and is_demo(tiny_cfg(name="study"))
    cifar = tiny_cfg(name="cnn_demo")
    assert not is_demo(replace(cifar, data=replace(cifar.data, source="cifar10")))


def test_a_broken_run_gets_no_verdict(seeded_run, tmp_path):
    """A teacher at chance and a student that predicts one class: the report names both and puts
    "not interpretable" where the verdicts were, in the text and in the figure's title."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(seeded_run, run)
    for seed in (0, 1):
        summary = pd.read_csv(run / f"seed_{seed}" / "summary.csv")
        summary.loc[summary["stage"] == "teacher", "test_accuracy"] = 0.11  # chance is 0.10 on digits
        summary.to_csv(run / f"seed_{seed}" / "summary.csv", index=False)
        preds = pd.read_csv(run / f"seed_{seed}" / "student_kd" / "test_predictions.csv")
        preds["y_pred"] = 3
        preds.to_csv(run / f"seed_{seed}" / "student_kd" / "test_predictions.csv", index=False)
    from src.analysis.report import sanity, collect
    reasons = sanity(collect([run]))["tiny"]
    assert "teacher teaches at 11.0% test accuracy, not clearly above chance (10%)" in reasons
    assert "student_kd predicts one class for 100% of the test images" in reasons
    text = write_report([run], tmp_path / "out").read_text()
    assert "**tiny: not interpretable.**" in text and "predicts one class" in text
    section = text.split("## Which assistant helps?")[1].split("##")[0]
    assert "not interpretable: teacher teaches at 11.0%" in section and " beat direct KD at p < 0.05" not in \
        section.split("(the tests alone")[0]
    diff_rows = [ln for ln in text.splitlines() if ln.startswith("| tiny | ") and "TAKD − KD" in ln]
    assert diff_rows and all("not interpretable" in ln for ln in diff_rows)


def test_a_broken_student_spoils_only_the_comparisons_it_is_in(seeded_run, tmp_path):
    """The TAKD student predicts one class, its teachers are sound: the rows with it read "not
    interpretable", KD − scratch keeps its verdict, and the banner says the run is partly broken."""
    import shutil
    from src.analysis.report import affected, collect
    run = tmp_path / "run"
    shutil.copytree(seeded_run, run)
    for seed in (0, 1):  # 2 epochs on digits: made sound here (right answers, curves that peaked) but one
        for path in (run / f"seed_{seed}").glob("*/test_predictions.csv"):
            preds = pd.read_csv(path)
            preds["y_pred"] = 3 if path.parent.name == "student" else preds["y_true"]
            preds.to_csv(path, index=False)
        summary = pd.read_csv(run / f"seed_{seed}" / "summary.csv")
        summary.loc[summary["stage"] != "student", "test_accuracy"] = 1.0
        summary.to_csv(run / f"seed_{seed}" / "summary.csv", index=False)
        for log in (run / f"seed_{seed}").glob("*/epoch_log.csv"):
            df = pd.read_csv(log)
            df.loc[df.index[-1], "val_accuracy"] = df["val_accuracy"].iloc[0] - 0.01
            df.to_csv(log, index=False)
    spoiled = affected(collect([run]))["tiny"]
    assert set(spoiled) == {"student"}  # nothing it taught, nothing that taught it is spoiled by it
    text = write_report([run], tmp_path / "out").read_text()
    assert "**tiny: partly not interpretable.**" in text and "involve student say nothing" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| tiny | ")]
    takd = [ln for ln in rows if "TAKD − KD" in ln]
    kd = [ln for ln in rows if "| KD − scratch |" in ln]
    assert takd and all("not interpretable" in ln for ln in takd)
    assert kd and not any("not interpretable" in ln for ln in kd)


def test_a_broken_teacher_spoils_everything_below_it():
    from src.analysis.report import affected
    rows = pd.DataFrame({"run": "r", "stage": ["teacher", "ta", "student", "student_kd", "student_scratch"],
                         "teacher": ["", "teacher", "ta", "teacher", ""], "role": ["teacher", "assistant"] + ["student"] * 3})
    problems = {"r": {"ta": ["ta predicts one class for 90% of the test images"]}}
    spoiled = affected(rows, problems)["r"]
    assert set(spoiled) == {"ta", "student"}  # the assistant and what it taught; direct KD and scratch stand
    problems = {"r": {"teacher": ["teacher teaches at 11.0% test accuracy"]}}
    assert set(affected(rows, problems)["r"]) == {"teacher", "ta", "student", "student_kd"}


def test_a_stage_still_rising_at_its_last_epoch_is_named(tmp_path):
    from src.analysis.report import still_rising
    from src.utils.logger import EpochLogger, REQUIRED_COLUMNS
    from src.runs.runfolder import StageFolder
    stage = StageFolder(tmp_path / "s")
    stage.path.mkdir()
    log = EpochLogger(stage.epoch_log)
    for e, v in enumerate([0.30, 0.40, 0.45, 0.50, 0.58], 1):
        log.log({c: (e if c == "epoch" else v if c == "val_accuracy" else 0.0) for c in REQUIRED_COLUMNS})
    assert still_rising(stage) == "+8.0 points over its last 1 of 5 epochs"
    log.log({c: (6 if c == "epoch" else 0.57 if c == "val_accuracy" else 0.0) for c in REQUIRED_COLUMNS})
    assert still_rising(stage) == ""  # the best epoch is not the last one


def test_an_over_seed_difference_without_spread_reads_undecided():
    """The same difference on every seed: no interval (not a zero-width one that "excludes 0"),
    and the report's row says undecided rather than significant."""
    from src.analysis.report import _diff_md
    from src.utils.stats import simultaneous_t_intervals
    (same, spread), alpha = simultaneous_t_intervals([[0.02, 0.02, 0.02], [0.01, 0.02, 0.04]])
    assert same[0] == pytest.approx(0.02) and np.isnan(same[1]) and np.isnan(same[2])
    assert alpha == pytest.approx(0.025) and spread[1] < spread[0] < spread[2]
    row = {"run": "tiny", "difference": "TAKD − KD", "a": "student", "b": "student_kd", "seed": "mean of 3", "mean": same[0], "low": same[1],
           "high": same[2], "only_a": np.nan, "only_b": np.nan, "p_value": np.nan, "p_holm": np.nan,
           "significant": False, "level": 1 - alpha}
    line = _diff_md(pd.DataFrame([row]))[-1]
    assert "undecided" in line and "significant" not in line
