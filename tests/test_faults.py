"""Nothing lost: resume, signals, NaN, bad input. Each case through the code path a user hits."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from src.distillation.chain import run_chain
from src.spec.config import to_dict
from src.distillation.engine import StopRequested
from src.utils.checkpoint import read_weights
from src.utils.logger import read_epoch_csv
from tests.conftest import ROOT, run_cli, tiny_cfg, validate

CMP = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate"]


def _rows(run, stage):
    return [{k: r[k] for k in ["epoch"] + CMP} for r in read_epoch_csv(run / stage / "epoch_log.csv")]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = tiny_cfg(train__epochs=3)
    run_chain(cfg, tmp_path / "full", progress=False)

    calls = {"n": 0}

    def stop_in_student_epoch_2():  # interrupt mid-epoch, after a few steps of the student's epoch 2
        calls["n"] += 1
        student_csv = tmp_path / "cut" / "student" / "epoch_log.csv"
        return student_csv.exists() and len(read_epoch_csv(student_csv)) == 1 and calls["n"] % 3 == 0
    with pytest.raises(StopRequested):
        run_chain(cfg, tmp_path / "cut", progress=False, should_stop=stop_in_student_epoch_2)
    assert len(read_epoch_csv(tmp_path / "cut" / "student" / "epoch_log.csv")) == 1
    first = json.loads((tmp_path / "cut" / "timings.json").read_text())  # the stopped session's time is kept
    assert first["sessions"] == 1 and first["wall"] > 0
    run_chain(cfg, tmp_path / "cut", resume=True, progress=False)
    for stage in ("teacher", "student"):
        assert _rows(tmp_path / "cut", stage) == _rows(tmp_path / "full", stage)
    timings = json.loads((tmp_path / "cut" / "timings.json").read_text())  # wall summed over both sessions
    assert timings["sessions"] == 2 and timings["wall"] > first["wall"] and timings["other"] >= 0
    assert timings["wall"] >= timings["training"] + timings["evaluation"] + timings["compile"]


def _write_cfg(tmp_path, **over):
    cfg = tiny_cfg(**over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def _start(tmp_path, cfg_path, out):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    return subprocess.Popen(["bash", str(ROOT / "cnn_distillation/train_cnn.sh"), "--no-progress", "--config",
                             str(cfg_path), "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)


def _wait_rows(csv, n, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if csv.exists() and len(csv.read_text().strip().splitlines()) >= n + 1:
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the CSV")


@pytest.mark.slow
def test_kill_9_then_resume_gives_one_row_per_epoch_and_a_complete_summary(tmp_path, monkeypatch, capsys):
    cfg_path = _write_cfg(tmp_path, train__epochs=3, data__max_train_samples=480)
    out = tmp_path / "run"
    proc = _start(tmp_path, cfg_path, out)
    _wait_rows(out / "teacher" / "epoch_log.csv", 1, proc)
    time.sleep(0.3)  # mid-epoch 2
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    code, err = run_cli("cnn", "--resume", out)
    assert code == 0, err[-2000:]
    for stage in ("teacher", "student"):
        assert [int(r["epoch"]) for r in read_epoch_csv(out / stage / "epoch_log.csv")] == [1, 2, 3]
    code, printed = validate(tmp_path, monkeypatch, capsys)
    assert code == 0, printed


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_and_says_how_to_resume(tmp_path, sig, code):
    cfg_path = _write_cfg(tmp_path, train__epochs=3, data__max_train_samples=480)
    out = tmp_path / "run"
    proc = _start(tmp_path, cfg_path, out)
    _wait_rows(out / "teacher" / "epoch_log.csv", 1, proc)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"--resume {out}" in err and "Traceback" not in err
    rows = read_epoch_csv(out / "teacher" / "epoch_log.csv")
    last = torch.load(out / "teacher" / "last.pt", weights_only=True)
    assert last["epoch"] == len(rows) >= 1  # every logged epoch has its checkpoint


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_nan_stops_naming_stage_epoch_step_and_keeps_earlier_results(tmp_path):
    cfg_path = _write_cfg(tmp_path, train__epochs=1)
    out = tmp_path / "run"
    code, _ = run_cli("cnn", "--config", cfg_path, "--output-dir", out)
    assert code == 0
    teacher_files = _digest(out / "teacher")
    broken = tmp_path / "run2"
    import shutil
    shutil.copytree(out / "teacher", broken / "teacher")
    (broken / "config.yaml").write_text(yaml.safe_dump({**yaml.safe_load((out / "config.yaml").read_text()),
                                                        "stages": [*yaml.safe_load((out / "config.yaml").read_text())["stages"][:1],
                                                                   {**yaml.safe_load((out / "config.yaml").read_text())["stages"][1], "lr": 1e12}]}))
    (broken / "teacher" / "stage.json").write_text((out / "teacher" / "stage.json").read_text())
    code, err = run_cli("cnn", "--resume", broken)
    assert code == 3, err
    assert "stage 'student', epoch 1, step" in err and "non-finite loss" in err
    assert "Traceback" not in err
    assert _digest(broken / "teacher") == teacher_files


@pytest.mark.parametrize("args,match", [
    (["--data-source", "imagefolder", "--data-root", "/nonexistent/data"], "dataset folder not found: /nonexistent/data"),
    (["--set", "train.epoch=3"], r"unknown config key \['epoch'\] in 'train'; valid keys: epochs"),
    (["--epochs", "-1"], "train.epochs must be >= 1"),
    (["--set", "kd.alpha_start=1.5"], r"kd.alpha_start must be in \[0, 1\]"),
    (["--set", "kd.temperature=0"], "kd.temperature must be > 0"),
    (["--set", "train.batch_size=many"], "train.batch_size: expected an integer"),
    (["--set", "stages.teacher.checkpoint=/nope/teacher.pt"], "checkpoint not found: /nope/teacher.pt"),
])
def test_bad_input_is_one_line_with_exit_2(tmp_path, args, match):
    import re
    cfg_path = _write_cfg(tmp_path, train__epochs=1)
    code, err = run_cli("cnn", "--config", cfg_path, "--output-dir", tmp_path / "run", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(match, lines[0]), err
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir())  # nothing half-made: the fixed command can reuse the folder


def test_teacher_checkpoint_with_wrong_class_count(tmp_path):
    from src.models import create_model
    ckpt = tmp_path / "t.pt"
    torch.save({"model": create_model("resnet10t", 100).state_dict()}, ckpt)
    cfg_path = _write_cfg(tmp_path, train__epochs=1)
    code, err = run_cli("cnn", "--config", cfg_path, "--output-dir", tmp_path / "run", "--set", f"stages.teacher.checkpoint={ckpt}")
    assert code == 2 and "class count does not match" in err


def test_a_teacher_from_a_checkpoint_is_said_to_be_loaded_not_trained(tmp_path, capsys):
    """Its line said "(epoch 0)": a teacher loaded from a checkpoint has no best epoch here."""
    from src.models import create_model
    ckpt = tmp_path / "t.pt"
    torch.save({"model": create_model("resnet10t", 10).state_dict()}, ckpt)
    cfg_path = _write_cfg(tmp_path, train__epochs=1)
    code, err = run_cli("cnn", "--config", cfg_path, "--output-dir", tmp_path / "run", "--set", f"stages.teacher.checkpoint={ckpt}")
    assert code == 0, err
    said = [ln for ln in capsys.readouterr().out.splitlines() if "→" in ln]
    assert "(loaded from its checkpoint, not trained here)" in said[0] and "epoch 0" not in said[0]
    assert "(epoch 1)" in said[1]


def test_cuda_asked_for_where_there_is_none(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, err = run_cli("cnn", "--config", _write_cfg(tmp_path), "--output-dir", tmp_path / "run", "--device", "cuda")
    assert code == 2 and "no CUDA device is visible" in err and "--device cpu" in err


def test_output_folder_that_cannot_be_written_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli("cnn", "--config", _write_cfg(tmp_path), "--output-dir", blocker / "run")
    assert code == 2 and "cannot write to the output folder" in err


def test_resume_into_a_csv_with_another_header_is_refused(tmp_path):
    out = tmp_path / "run"
    assert run_cli("cnn", "--config", _write_cfg(tmp_path, train__epochs=1), "--output-dir", out)[0] == 0
    (out / "student" / "stage.json").unlink()  # pretend the student stage was interrupted
    csv = out / "student" / "epoch_log.csv"
    csv.write_text(csv.read_text().replace("train_loss", "loss", 1))
    before = csv.read_text()
    code, err = run_cli("cnn", "--resume", out)
    assert code == 2 and "header does not match REQUIRED_COLUMNS" in err
    assert csv.read_text() == before


def test_no_shell_true_and_only_safe_yaml_and_weights_only_loads():
    offenders = []
    for path in list((ROOT / "src").rglob("*.py")) + [ROOT / "validate_project.py"] + list((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        if "shell=True" in text or "yaml.load(" in text or "yaml.unsafe_load" in text:
            offenders.append(str(path))
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path}: {line.strip()}")
    assert not offenders


def test_kill_between_checkpoint_and_csv_row_loses_no_epoch(tmp_path, monkeypatch):
    from src.distillation import stage as stage_mod
    cfg = tiny_cfg(train__epochs=2, stages=[{"name": "teacher", "model": "resnet10t", "role": "teacher"}])
    run_chain(cfg, tmp_path / "full", progress=False)
    run = tmp_path / "cut"
    with monkeypatch.context() as m:  # last.pt as the epoch left it: a finished stage's slimming comes later
        m.setattr(stage_mod, "slim_checkpoint", lambda path: 0)
        run_chain(cfg, run, progress=False)
    # the state a kill leaves right after last.pt of epoch 2 was saved but before its row was appended
    (run / "teacher" / "stage.json").unlink()
    csv = run / "teacher" / "epoch_log.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[:2]) + "\n")
    run_chain(cfg, run, resume=True, progress=False)
    assert _rows(run, "teacher") == _rows(tmp_path / "full", "teacher")


def test_unavailable_pretrained_weights_of_a_later_stage_fail_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg_path = _write_cfg(tmp_path, train__epochs=1)
    code, err = run_cli("cnn", "--config", cfg_path, "--output-dir", tmp_path / "run",
                        "--set", "stages.student.pretrained=true")
    assert code == 2 and "pretrained_file" in err
    assert not (tmp_path / "run" / "teacher").exists()  # no time spent on the teacher


def test_default_command_offline_names_the_flags_and_leaves_nothing_behind(tmp_path):
    """The README's first command without a network: one line with the ready offline command;
    no run folder and no empty download folder left behind."""
    data, out = tmp_path / "cifar", tmp_path / "run"
    code, err = run_cli("cnn", "--data-root", data, "--output-dir", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--data-source imagefolder --data-root ../shared/data/cifar10-jpeg.tar.gz" in err
    assert "data.source" not in err and "extracted" not in err
    assert not data.exists() and not out.exists()


def test_subsampled_image_tree_decodes_only_what_it_uses(image_tree, monkeypatch):
    from src.data import sources
    from src.spec.config import DataConfig
    decoded = []
    real = sources.decode_images

    def counting(files, *a, **k):
        decoded.extend(files)
        return real(files, *a, **k)
    monkeypatch.setattr(sources, "decode_images", counting)
    d = DataConfig(source="imagefolder", root=str(image_tree), max_train_samples=6, max_test_samples=4,
                   cache_dir=str(image_tree.parent / "cache"))
    data = sources.load_dataset(d)
    assert len(decoded) == 10 and len(data.train) + len(data.val) == 6 and len(data.test) == 4


# ------------------------------------------------------------------ faults answered with one line (issue list)
def _one_line(code, err, expected_code=2):
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_truncated_tarball_is_one_line_and_leaves_no_partial_folder(tmp_path, image_tree, monkeypatch):
    import tarfile
    from src.data import sources
    good = tmp_path / "tree.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(image_tree, arcname="tree")
    bad = tmp_path / "cut.tar.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    monkeypatch.setattr(sources, "EXTRACT_DIR", tmp_path / "cache")
    monkeypatch.setattr(sources.extract_archive, "__defaults__", (tmp_path / "cache",))
    code, err = run_cli("cnn", "--config", _write_cfg(tmp_path), "--output-dir", tmp_path / "run",
                        "--data-source", "imagefolder", "--data-root", bad)
    line = _one_line(code, err)
    assert "truncated or corrupt" in line and "copy or download it again" in line
    assert not any((tmp_path / "cache").glob("*.partial"))


def test_text_file_as_data_root_says_it_is_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    line = _one_line(*run_cli("cnn", "--config", _write_cfg(tmp_path), "--output-dir", tmp_path / "run",
                              "--data-source", "imagefolder", "--data-root", f))
    assert "is a file, not a dataset folder" in line


@pytest.mark.parametrize("where", ["open", "mid-write", "fsync", "rename"])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, where):
    """ENOSPC (or torch.save's RuntimeError) at several points of a save: SaveError naming the file,
    the previous checkpoint intact, no .tmp left holding the space."""
    import errno
    from src.utils import checkpoint
    from src.utils.checkpoint import SaveError, atomic_save, safe_load
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    full = OSError(errno.ENOSPC, "No space left on device")
    real_open, real_fsync, real_replace, real_save = open, os.fsync, os.replace, torch.save
    if where == "open":
        monkeypatch.setattr("builtins.open", lambda p, *a, **k: (_ for _ in ()).throw(full) if str(p).endswith(".tmp") else real_open(p, *a, **k))
    elif where == "mid-write":
        def half(obj, f):
            f.write(b"x" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        monkeypatch.setattr(checkpoint.torch, "save", half)
    elif where == "fsync":
        monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (_ for _ in ()).throw(full))
    else:
        monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (_ for _ in ()).throw(full))
    with pytest.raises(SaveError, match="could not write .*last.pt.*previous version is kept"):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert safe_load(path)["epoch"] == 1 and not (tmp_path / "last.pt.tmp").exists()
    del real_fsync, real_replace, real_save


def test_yaml_with_a_python_tag_is_one_line(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo hacked']\nstages: [{name: t, model: resnet18}]\n")
    line = _one_line(*run_cli("cnn", "--config", p, "--output-dir", tmp_path / "run"))
    assert "!!python/object/apply:os.system is refused" in line


def test_top_level_list_with_an_override_is_one_line(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    line = _one_line(*run_cli("cnn", "--config", p, "--output-dir", tmp_path / "run", "--device", "cpu"))
    assert "top level must be a mapping" in line


def test_numbers_as_people_write_them(tmp_path):
    from src.spec.config import load_config
    cfg = load_config(_write_cfg(tmp_path), ["train.lr=1e-3", "train.weight_decay=5E-2", "kd.temperature=2"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.kd.temperature) == (1e-3, 5e-2, 2.0)
    p = tmp_path / "sci.yaml"
    p.write_text(_write_cfg(tmp_path).read_text().replace("lr: 0.003", "lr: 3e-3"))
    assert load_config(p).train.lr == 3e-3


def test_shortcut_and_set_for_the_same_key_are_refused(tmp_path):
    line = _one_line(*run_cli("cnn", "--config", _write_cfg(tmp_path), "--output-dir", tmp_path / "run",
                              "--epochs", "2", "--set", "train.epochs=5"))
    assert "--epochs and --set train.epochs" in line


def test_resume_applies_a_new_lr_and_more_epochs_and_refuses_other_changes(tmp_path):
    cfg_path = _write_cfg(tmp_path, train__epochs=3, data__max_train_samples=480)
    out = tmp_path / "run"
    proc = _start(tmp_path, cfg_path, out)  # stopped in the student's stage, as a user's Ctrl-C would
    _wait_rows(out / "student" / "epoch_log.csv", 1, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert not (out / "student" / "stage.json").exists()
    line = _one_line(*run_cli("cnn", "--resume", out, "--set", "data.image_size=32"))
    assert "data.image_size cannot change on resume" in line
    line = _one_line(*run_cli("cnn", "--resume", out, "--epochs", "3", "--set", "stages.student.epochs=0"))
    assert "epochs must be >= 1" in line and not (out / "resume_overrides.json").exists()  # refused: nothing written
    code, err = run_cli("cnn", "--resume", out, "--lr", "1e-4", "--epochs", "4")
    assert code == 0, err
    history = json.loads((out / "resume_overrides.json").read_text())
    assert history[-1]["changed"]["train.lr"][1] == 1e-4 and history[-1]["changed"]["train.epochs"] == [3, 4]
    rows = read_epoch_csv(out / "student" / "epoch_log.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    student = json.loads((out / "student" / "stage.json").read_text())
    assert student["lr"] == pytest.approx(1e-4 * 0.5)  # the student's role factor on the new base LR
    assert rows[-1]["learning_rate"] <= 1e-4 * 0.5 + 1e-12  # the resumed epochs trained with it
    teacher_rows = read_epoch_csv(out / "teacher" / "epoch_log.csv")
    assert len(teacher_rows) == 3  # a finished stage is left as it was
    line = _one_line(*run_cli("cnn", "--resume", out, "--epochs", "1"))
    assert "can only grow" in line


def test_later_stage_checkpoint_of_another_class_count_is_refused_before_anything_is_written(tmp_path):
    from src.models import create_model
    ckpt = tmp_path / "s.pt"
    torch.save({"model": create_model("resnet10t", 100).state_dict()}, ckpt)
    out = tmp_path / "run"
    line = _one_line(*run_cli("cnn", "--config", _write_cfg(tmp_path, train__epochs=1), "--output-dir", out,
                              "--set", f"stages.student.checkpoint={ckpt}"))
    assert "class count does not match" in line
    assert not out.exists()  # no half-made run folder: the same command works once fixed


@pytest.mark.parametrize("phase", ["planning", "final evaluation", "report"])
def test_sigterm_stops_promptly_in_every_phase(tmp_path, monkeypatch, phase):
    from src.distillation import chain, stage
    from src.analysis import report

    def send_and(fn):
        def wrapper(*a, **k):
            if phase != "final evaluation" or k.get("return_predictions"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the handler raises here: nothing after this line runs
                raise AssertionError("signal ignored")
            return fn(*a, **k)
        return wrapper
    target = {"planning": (chain, "plan_stage"), "final evaluation": (stage, "evaluate"),
              "report": (report, "write_report")}[phase]
    monkeypatch.setattr(*target, send_and(getattr(*target)))
    out = tmp_path / "run"
    code, err = run_cli("cnn", "--config", _write_cfg(tmp_path, train__epochs=1), "--output-dir", out)
    assert code == 143, err
    assert "--resume" in err and "Traceback" not in err and "signal ignored" not in err
    monkeypatch.undo()
    code, err = run_cli("cnn", "--resume", out)
    assert code == 0, err
    assert (out / "report.md").exists() and (out / "student" / "stage.json").exists()


def test_printed_resume_command_works_from_the_users_folder(tmp_path):
    cfg_path = _write_cfg(tmp_path, train__epochs=2)  # stopped anywhere after the teacher's first epoch
    out = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(["bash", str(ROOT / "cnn_distillation/train_cnn.sh"), "--no-progress", "--config",
                             str(cfg_path), "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True, cwd=tmp_path)
    _wait_rows(out / "teacher" / "epoch_log.csv", 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("bash ") and "--resume" in command
    res = subprocess.run(command.split() + ["--no-progress"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]


def test_killed_before_anything_was_saved_the_same_command_starts_again(tmp_path):
    """SIGKILL while config.yaml was being written leaves only config.yaml.tmp (found by the chaos test)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml.tmp").write_text("name: half")
    line = _one_line(*run_cli("cnn", "--resume", out))
    assert "start it again with the same command" in line
    code, err = run_cli("cnn", "--config", _write_cfg(tmp_path, train__epochs=1), "--output-dir", out)
    assert code == 0, err


def test_a_stop_inside_an_epoch_saves_it_part_way_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = tiny_cfg(train__epochs=2, data__max_train_samples=480)
    run_chain(cfg, tmp_path / "full", progress=False)
    calls = {"n": 0}

    def stop_mid_student_epoch_1():  # a few steps into the student's first epoch
        if (tmp_path / "cut" / "teacher" / "stage.json").exists():
            calls["n"] += 1
        return calls["n"] > 5
    with pytest.raises(StopRequested) as stopped:
        run_chain(cfg, tmp_path / "cut", progress=False, should_stop=stop_mid_student_epoch_1)
    assert "student: epoch 1 up to step" in stopped.value.saved and "last.pt" in stopped.value.saved
    partial = torch.load(tmp_path / "cut" / "student" / "last.pt", weights_only=True)["partial"]
    assert partial["epoch"] == 1 and 0 < partial["next_step"] < len(partial["step_losses"]) + 2
    from src.distillation import stage as stage_module
    clock_calls = []
    real = stage_module.whole_epoch_seconds
    monkeypatch.setattr(stage_module, "whole_epoch_seconds",
                        lambda *a: clock_calls.append(a) or real(*a))
    run_chain(cfg, tmp_path / "cut", resume=True, progress=False)
    # the clock hears the resumed epoch as a whole one: the steps taken before the stop are named
    assert [c[3] for c in clock_calls] == [partial["next_step"], 0]
    assert clock_calls[0][2] > partial["next_step"]  # the epoch's steps, all of them, not those run after the resume
    for stage in ("teacher", "student"):
        assert _rows(tmp_path / "cut", stage) == _rows(tmp_path / "full", stage)
        a = read_weights(tmp_path / "full" / stage / "best.pt")
        b = read_weights(tmp_path / "cut" / stage / "best.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    assert (tmp_path / "cut" / "student" / "schedule.csv").read_text() == \
        (tmp_path / "full" / "student" / "schedule.csv").read_text()


def test_a_stop_between_micro_batches_undoes_the_step_and_the_epoch_ends_the_same():
    import copy
    from src.distillation.engine import Precision, StepContext, train_one_epoch
    from src.distillation.recipe import make_optimizer
    from src.models import create_model
    from src.utils.checkpoint import rng_state, set_rng_state
    torch.manual_seed(0)
    init = create_model("resnet10t", 10).state_dict()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(6)]

    class Loader(list):
        batch_index = None

    def context(stop=lambda: False, saves=None):
        model = create_model("resnet10t", 10)
        model.load_state_dict(init)
        opt = make_optimizer(model, 0.01, 0.0, torch.device("cpu"), "sgd", 0.9)
        ctx = StepContext(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                          precision=Precision("cpu", None), num_classes=10, micro_batch=4, should_stop=stop)
        if saves is not None:
            ctx.save_partial = lambda state: saves.append((copy.deepcopy(state), copy.deepcopy(model.state_dict()),
                                                          copy.deepcopy(opt.state_dict()), rng_state())) or "saved"
        return ctx

    torch.manual_seed(5)
    whole = context()
    ref = train_one_epoch(whole, Loader(batches), alpha=0.0, progress=False)
    calls, saves = {"n": 0}, []
    torch.manual_seed(5)

    def stop():  # 3 checks between a step's 4 micro-batches and 1 after it: the 11th falls inside step 2 (from 0)
        calls["n"] += 1
        return calls["n"] > 10
    cut = context(stop, saves)
    with pytest.raises(StopRequested):
        train_one_epoch(cut, Loader(batches), alpha=0.0, progress=False)
    state, weights, opt_state, rng = saves[-1]
    assert state["next_step"] == 2  # the step in progress was undone, not half-applied
    again = context()
    again.model.load_state_dict(weights)
    again.optimizer.load_state_dict(opt_state)
    set_rng_state(rng)
    out = train_one_epoch(again, Loader(batches), alpha=0.0, progress=False, resume=state)
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(), again.model.state_dict().values()))
    assert out["loss"] == ref["loss"] and out["accuracy"] == ref["accuracy"] and out["lrs"] == ref["lrs"]


def test_an_epoch_is_saved_part_way_every_few_minutes():
    from src.distillation.engine import Precision, StepContext, train_one_epoch
    from src.distillation.recipe import make_optimizer
    from src.models import create_model
    model = create_model("resnet10t", 10)
    opt = make_optimizer(model, 0.01, 0.0, torch.device("cpu"), "sgd", 0.9)
    saved = []
    ctx = StepContext(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                      precision=Precision("cpu", None), num_classes=10, checkpoint_every_s=1e-9,
                      save_partial=lambda state: saved.append(state["next_step"]))
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(5)]
    train_one_epoch(ctx, batches, alpha=0.0, progress=False)
    assert saved == [1, 2, 3, 4]  # after every step but the last (the end of the epoch saves it whole)
