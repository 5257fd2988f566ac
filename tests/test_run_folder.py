"""One run, one folder: concurrent starts, hand-edited configs, stale probe files, and the small
refusals a careful user with a second terminal and an editor meets."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from src.spec.config import to_dict
from src.runs import runlock
from src.runs.runfolder import StageFolder
from tests.conftest import ROOT, run_cli, tiny_cfg, validate


def _cfg_file(tmp_path, **over):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_cfg(**over))))
    return path


def _start(cfg_path, out):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    return subprocess.Popen(["bash", str(ROOT / "cnn_distillation/train_cnn.sh"), "--no-progress", "--config",
                             str(cfg_path), "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_two_starts_into_one_folder_one_trains_the_other_refuses(tmp_path):
    """Two real processes started together, twice: never both in the folder."""
    cfg = _cfg_file(tmp_path, train__epochs=1)
    for attempt in range(2):
        out = tmp_path / f"race{attempt}"
        procs = [_start(cfg, out), _start(cfg, out)]
        results = [(p.wait(timeout=900), *p.communicate()) for p in procs]
        codes = sorted(code for code, _, _ in results)
        assert codes == [0, 2], [(c, e[-800:]) for c, _, e in results]
        refused = next(err for code, _, err in results if code == 2)
        line = refused.strip().splitlines()[-1]
        assert line.startswith("error:") and ("in use by pid" in line or "already holds files" in line), refused
        log = (out / "teacher" / "epoch_log.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in log[1:]] == ["1"]  # one writer: no repeated epoch
        assert not (out / "env_resume.json").exists() and not (out / runlock.LOCK_NAME).exists()


def test_a_live_owner_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    held = runlock.acquire(run, "training")
    code, err = run_cli("cnn", "--resume", run)
    assert code == 2 and f"in use by pid {os.getpid()}" in err
    code, err = run_cli("cnn", "--config", _cfg_file(tmp_path), "--output-dir", run)
    assert code == 2 and "in use by pid" in err
    from src.analysis.report import main as report_main
    assert report_main([str(run)]) == 2  # python -m src.report RUN
    held.release()
    # a SIGKILLed owner leaves its lock file behind, but not its flock: the folder is free
    killer = subprocess.run([sys.executable, "-c", "import os, sys; sys.path.insert(0, '.'); "
                             "from src.runs import runlock; runlock.acquire(sys.argv[1]); os.kill(os.getpid(), 9)",
                             str(run)], cwd=ROOT)
    assert killer.returncode == -9 and (run / runlock.LOCK_NAME).exists()
    runlock.acquire(run).release()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fin")
    run = tmp / "run"
    code, err = run_cli("cnn", "--config", _cfg_file(tmp, train__epochs=1), "--output-dir", run)
    assert code == 0, err
    return run


def test_a_hand_edited_config_is_refused_on_resume_naming_the_keys(finished_run, tmp_path):
    import shutil
    run = tmp_path / "edited"
    shutil.copytree(finished_run, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text("# a comment changes no value\n" + text)
    code, err = run_cli("cnn", "--resume", run)
    assert code == 0, err  # formatting only: accepted
    raw = yaml.safe_load(text)
    raw["stages"][0]["model"] = "resnet18"
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    code, err = run_cli("cnn", "--resume", run)
    assert code == 2 and "stages.teacher.model" in err and "edited" in err
    assert len(err.strip().splitlines()) == 1


def test_resume_overrides_it_accepted_itself_are_not_hand_edits(finished_run, tmp_path):
    import shutil
    run = tmp_path / "more"
    shutil.copytree(finished_run, run)
    code, err = run_cli("cnn", "--resume", run, "--epochs", "2")
    assert code == 0, err
    code, err = run_cli("cnn", "--resume", run)
    assert code == 0, err


def test_tensorboard_on_resume_with_tb_a_file_changes_nothing(finished_run, tmp_path):
    import shutil
    run = tmp_path / "tbfile"
    shutil.copytree(finished_run, run)
    (run / "tb").write_text("not a folder")
    before = (run / "config.yaml").read_text()
    code, err = run_cli("cnn", "--resume", run, "--tensorboard")
    assert code == 2 and str(run / "tb") in err and "file" in err
    assert (run / "config.yaml").read_text() == before


def test_evaluate_out_that_is_a_file_is_one_line(finished_run, tmp_path):
    target = tmp_path / "metrics"
    target.write_text("x")
    res = subprocess.run([sys.executable, "-m", "src.evaluate", str(finished_run), "--stage", "student", "--out",
                          str(target), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and "is a file" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_stale_probe_files_do_not_block_a_start_or_a_resume(finished_run, tmp_path):
    import shutil
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".write_test").write_text("ok")  # what a SIGKILL during the probe leaves
    code, err = run_cli("cnn", "--config", _cfg_file(tmp_path, train__epochs=1), "--output-dir", fresh)
    assert code == 0, err
    run = tmp_path / "resumed"
    shutil.copytree(finished_run, run)
    (run / ".write_test.4242").write_text("ok")
    code, err = run_cli("cnn", "--resume", run)
    assert code == 0, err
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".write_test").write_text("ok")
    code, err = run_cli("cnn", "--resume", killed)
    assert code == 2 and "start it again with the same command" in err


def test_a_class_with_one_image_keeps_the_others_stratified():
    from src.data.sources import _split_val
    from tests.test_engine import console_messages
    labels = np.array([0] * 30 + [1] * 30 + [2] * 30 + [3])
    with console_messages() as warned:
        tr, val = _split_val(labels, 0.1, seed=0, classes=["a", "b", "c", "single"])
    counts = np.bincount(labels[val], minlength=4)
    assert counts.tolist() == [3, 3, 3, 0]          # about 3 each were due; the single image stays in train
    assert 90 in tr and len(tr) + len(val) == len(labels) and not set(tr) & set(val)
    assert len([m for m in warned if "single training image" in m]) == 1 and "(single)" in warned[0]
    # without singletons the split is the one it always was
    from sklearn.model_selection import train_test_split
    plain = np.array([0] * 30 + [1] * 30)
    tr, val = _split_val(plain, 0.1, seed=0)
    _, expected = train_test_split(np.arange(60), test_size=6, random_state=0, stratify=plain)
    assert sorted(val.tolist()) == sorted(expected.tolist())


def test_the_lock_holds_the_owner_and_goes_with_it(tmp_path):
    lock = runlock.acquire(tmp_path / "r", "training")
    info = json.loads((tmp_path / "r" / runlock.LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] and info["what"] == "training"
    lock.release()
    assert not (tmp_path / "r" / runlock.LOCK_NAME).exists()


def test_clean_removes_run_folders_only(tmp_path, monkeypatch):
    """--remove against a file, '.', a symbolic link to a run and a real run folder."""
    from src.runs.clean import main
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    (run / "env.json").write_text("{}")
    readme = tmp_path / "README.md"
    readme.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(run)
    plain = tmp_path / "photos"
    plain.mkdir()
    monkeypatch.chdir(tmp_path)
    for target in (readme, ".", link, plain):
        assert main(["--remove", str(target), "--yes"]) == 2
    assert readme.read_text() == "keep me" and run.is_dir() and link.is_symlink() and plain.is_dir()
    assert main(["--remove", str(run), "--yes"]) == 0 and not run.exists() and link.is_symlink()


def test_clean_refuses_a_run_a_live_process_trains_in_and_deletes_nothing(tmp_path, capsys):
    """The run's own lock (and that of every run inside it: the seeds) is taken before deleting."""
    from src.runs.clean import main
    runs = []
    for name in ("single", "seeds"):
        run = tmp_path / name
        run.mkdir()
        (run / ("seeds.json" if name == "seeds" else "config.yaml")).write_text("{}")
        (run / "env.json").write_text("{}")
        runs.append(run)
    (tmp_path / "seeds" / "seed_1").mkdir()
    for held in (runs[0], tmp_path / "seeds" / "seed_1"):  # a live trainer: the top folder, or one seed's folder
        lock = runlock.acquire(held, "training")
        capsys.readouterr()
        assert main(["--remove", str(runs[0]), "--remove", str(runs[1]), "--yes"]) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "nothing deleted" in err and str(held) in err
        assert all(r.is_dir() for r in runs) and (held / runlock.LOCK_NAME).exists()
        lock.release()
    assert main(["--remove", str(runs[0]), "--remove", str(runs[1]), "--yes"]) == 0
    assert not any(r.exists() for r in runs)


def test_a_run_whose_folder_is_deleted_under_it_says_so(tmp_path):
    import shutil
    from src.utils.checkpoint import SaveError, atomic_save
    from src.utils.logger import EpochLogger
    stage = tmp_path / "run" / "teacher"
    stage.mkdir(parents=True)
    log = EpochLogger(stage / "epoch_log.csv")
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(SaveError, match="was deleted while this run was writing into it") as err:
        atomic_save({"x": 1}, stage / "best.pt")
    assert "--resume" not in str(err.value) and "Free disk space" not in str(err.value)
    from src.utils.logger import REQUIRED_COLUMNS
    from src.utils.errors import UserError
    with pytest.raises(UserError, match="was deleted while this run was writing into it"):
        log.log({c: 1.0 for c in REQUIRED_COLUMNS})


def test_validator_fails_on_a_runs_folder_that_does_not_exist(tmp_path, monkeypatch, capsys):
    code, printed = validate(tmp_path / "nonexistent", monkeypatch, capsys)
    assert code == 1 and "does not exist" in printed and "All validations passed" not in printed


def test_validator_tells_a_run_being_written_from_a_dead_one(tmp_path):
    sys.path.insert(0, str(ROOT))
    from validate_project import check_run_folder
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(tiny_cfg())))
    with pytest.raises(AssertionError, match="not running"):
        check_run_folder(run)
    with runlock.claim(run):
        assert f"pid {os.getpid()}" in check_run_folder(run)


def test_clean_shows_and_on_request_deletes_the_data_cache(tmp_path, monkeypatch, capsys):
    from src.runs import clean
    monkeypatch.setattr(clean, "REPO_ROOT", tmp_path)
    cache = tmp_path / ".data_cache" / "tree"
    cache.mkdir(parents=True)
    (cache / "x.bin").write_bytes(b"0" * (3 * 2**20))
    assert clean.main([]) == 0
    assert "Data cache" in capsys.readouterr().out and cache.exists()  # shown, kept
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert clean.main(["--data-cache"]) == 2 and cache.exists()         # no terminal, no --yes: refused
    assert clean.main(["--data-cache", "--yes"]) == 0
    assert not (tmp_path / ".data_cache").exists() and "Deleted" in capsys.readouterr().out


def test_a_finished_stage_keeps_its_weights_in_best_pt_and_the_export_only(tmp_path, monkeypatch):
    from src.distillation import stage as stage_mod
    from src.distillation.chain import run_chain
    from src.utils.checkpoint import safe_load
    from tests.conftest import tiny_cfg
    with monkeypatch.context() as m:  # killed between each stage's stage.json and its slimming
        m.setattr(stage_mod, "slim_checkpoint", lambda path: 0)
        run_chain(tiny_cfg(train__epochs=1), tmp_path / "run", progress=False)
    assert safe_load(tmp_path / "run" / "teacher" / "last.pt")["model"] is not None
    run_chain(tiny_cfg(train__epochs=1), tmp_path / "run", resume=True, progress=False)  # slimmed on resume
    for stage in ("teacher", "student"):
        d = tmp_path / "run" / stage
        last, best = safe_load(d / "last.pt"), safe_load(d / "best.pt")
        assert last["model"] is None and last["optimizer"] is None and last["epoch"] == 1 and last["best_epoch"] == 1
        assert best["model"] is None and best["weights"] == "model.safetensors" and best["epoch"] == 1
        assert StageFolder(d).state_dict()  # the weights, once at full size, in the export
        for small in ("last.pt", "best.pt"):
            assert (d / small).stat().st_size < 0.05 * (d / "model.safetensors").stat().st_size
