"""A study as a plan of stage jobs, run by any executor: the same weights bit for bit (each
stage's rank_weight_checksums) under serial, --jobs 2 and a two-node Ray cluster, a worker killed
mid-stage included; a stop reaches every job and --resume finishes the study; bad input is one line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.plan.jobs import build_plan
from src.runs import runlock
from src.runs.runfolder import RunFolder
from tests.conftest import ROOT, run_cli, tiny_cfg

STUDY = ["--seeds", "0,1", "--baselines", "--methods", "dkd", "--threads", "1"]
CONFIG = """name: tiny_study
seed: 0
deterministic: true
data: {source: digits, image_size: 16, max_train_samples: 600, max_test_samples: 60, augment: crop_flip, crop_padding: 2}
train: {epochs: 2, batch_size: 32, lr: 0.003, device: cpu}
stages:
  - {name: teacher, model: plain_cnn4, role: teacher, epochs: 8}
  - {name: assistant, model: plain_cnn2, role: assistant, teacher: teacher}
  - {name: student, model: plain_cnn2, role: student, teacher: assistant}
"""


def start(config: Path, out: Path, *extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)  # the plan's --threads decides
    return subprocess.Popen([sys.executable, "-m", "cnn_distillation.train_cnn", "--no-progress", "--config", str(config),
                             "--output-dir", str(out), *STUDY, *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def checksums(run: Path) -> dict:
    return {str(p.relative_to(run)): json.loads(p.read_text())["rank_weight_checksums"]
            for p in sorted(run.rglob("stage.json"))}


def kill_when_training(folder: Path, sig=signal.SIGKILL, timeout=240) -> int:
    """Wait until the stage in `folder` has logged an epoch, then send `sig` to the process holding its lock."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        log, info = folder / "epoch_log.csv", runlock.owner(folder)
        if log.exists() and len(log.read_text().splitlines()) >= 2 and info and not (folder / "stage.json").exists():
            os.kill(info["pid"], sig)
            return info["pid"]
        time.sleep(0.05)
    raise AssertionError(f"{folder} never trained")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The config, and the serial run every executor must equal."""
    root = tmp_path_factory.mktemp("study")
    config = root / "tiny.yaml"
    config.write_text(CONFIG)
    proc = start(config, root / "serial")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    sums = checksums(root / "serial")
    assert len(sums) == 14  # 7 stages x 2 seeds
    return config, root, sums


def test_the_plan_is_one_job_per_stage_and_seed_with_its_teachers_as_needs(tmp_path):
    cfg = tiny_cfg(stages=[{"name": "teacher", "model": "plain_cnn2"},
                           {"name": "ta", "model": "plain_cnn2", "teacher": "teacher"},
                           {"name": "student", "model": "plain_cnn2", "teacher": "ta"},
                           {"name": "student_kd", "model": "plain_cnn2", "teacher": "teacher"}])
    plan = build_plan(cfg, RunFolder(tmp_path / "run"), seeds=[0, 3], threads=1)
    assert [j.id for j in plan.jobs][:4] == ["seed_0/teacher", "seed_0/ta", "seed_0/student", "seed_0/student_kd"]
    assert plan.job("seed_3/student").needs == ("seed_3/ta",) and plan.job("seed_3/student").cfg.seed == 3
    assert plan.job("seed_3/student").folder.path == tmp_path / "run" / "seed_3" / "student"
    assert plan.dependants("seed_0/ta") == {"seed_0/student"}
    seconds = {j.id: {"teacher": 10, "ta": 5, "student": 1, "student_kd": 3}[j.stage] for j in plan.jobs}
    total, path = plan.critical_path(seconds)
    assert total == 16 and path == ["seed_0/teacher", "seed_0/ta", "seed_0/student"]
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_graph_and_writes_nothing(tmp_path, study):
    config = study[0]
    code, err = run_cli("cnn", "--config", config, "--output-dir", tmp_path / "dry", *STUDY, "--dry-run")
    assert code == 0, err
    assert not (tmp_path / "dry").exists()


def test_dry_run_text_names_jobs_needs_threads_and_the_critical_path(tmp_path, study):
    proc = subprocess.run([sys.executable, "-m", "cnn_distillation.train_cnn", "--no-progress", "--config", str(study[0]),
                           "--output-dir", str(tmp_path / "dry"), *STUDY, "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "14 stage jobs" in proc.stdout and "seed_1/student_dkd_via_assistant" in proc.stdout
    assert "critical path:" in proc.stdout and "seed_0/teacher -> seed_0/assistant" in proc.stdout
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--executor", "ray", "--ray-address", "127.0.0.1:1"], "no Ray cluster answers there"),
    (["--gpus", "2", "--jobs", "2"], "choose one"),
])
def test_bad_executor_input_is_one_line_and_writes_nothing(tmp_path, study, args, message):
    code, err = run_cli("cnn", "--config", study[0], "--output-dir", tmp_path / "bad", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_two_jobs_at_once_with_a_worker_killed_mid_stage_equal_the_serial_run(study):
    """--jobs 2: the teacher's process is SIGKILLed after its first epoch; the job is tried again
    from its last checkpoint, the study finishes, and every stage equals the serial run bit for bit."""
    config, root, serial = study
    out = root / "local"
    proc = start(config, out, "--jobs", "2")
    kill_when_training(out / "seed_0" / "teacher")
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    assert "its process died" in text and "trying again from its last checkpoint" in text
    assert checksums(out) == serial
    assert (out / "seed_0" / "logs" / "student_dkd.log").exists() and json.loads((out / "jobs.json").read_text())["threads"] == 1


def test_a_stop_reaches_every_job_and_resume_finishes_the_study(study):
    """SIGINT to the study under --jobs 2: every job saves and stops, no process is left, one
    --resume line; the resumed study equals the serial run bit for bit."""
    config, root, serial = study
    out = root / "stopped"
    proc = start(config, out, "--jobs", "2")
    kill_when_training(out / "seed_0" / "teacher", sig=0)  # signal 0: only wait until it trains
    time.sleep(0.5)
    workers = [runlock.owner(f)["pid"] for f in (out / "seed_0").iterdir() if f.is_dir() and runlock.owner(f)]
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, text[-3000:]
    assert text.count("--resume") == 1 and f"--resume {out}" in text
    for pid in workers:  # no orphan keeps training
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    resumed = subprocess.run([sys.executable, "-m", "cnn_distillation.train_cnn", "--no-progress", "--resume", str(out),
                              "--jobs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert checksums(out) == serial


def test_a_two_node_ray_cluster_gives_the_serial_weights_with_a_worker_killed(study):
    """ray.cluster_utils.Cluster: two nodes of one CPU each on this machine; the study joins it by
    address, a job's process is SIGKILLed mid-stage (Ray retries the task, the stage resumes),
    and every stage equals the serial run bit for bit."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster
    config, root, serial = study
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        out = root / "ray"
        proc = start(config, out, "--executor", "ray", "--ray-address", cluster.address)
        kill_when_training(out / "seed_1" / "teacher")
        text, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, text[-3000:]
        assert checksums(out) == serial
    finally:
        ray.shutdown()
        cluster.shutdown()


BOOM = '''
from src.distillation.methods import KD


class Boom(KD):
    """KD that breaks in its second epoch (after the test batch every method passes at the start)."""
    def distill(self, student_logits, teacher_logits):
        if self.epoch >= 2:
            raise RuntimeError("boom in epoch 2")
        return super().distill(student_logits, teacher_logits)
'''


def test_a_failed_job_stops_only_the_jobs_that_need_it(tmp_path):
    """The assistant's method breaks: its student does not run, every other job finishes, the
    error names the failed job and its log, and the exit code is not 0."""
    method = tmp_path / "boom.py"
    method.write_text(BOOM)
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.replace("max_train_samples: 600", "max_train_samples: 160").replace(", epochs: 8", "")
                      .replace("teacher: teacher}", f"teacher: teacher, method: '{method}:Boom'}}"))
    out = tmp_path / "run"
    proc = start(config, out, "--jobs", "2")
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, text[-3000:]
    assert "seed_0/assistant (exit 1; log" in text and str(out / "seed_0" / "logs" / "assistant.log") in text
    assert "not run, since they need it: " in text and "seed_0/student" in text and "--resume" in text
    assert "boom in epoch 2" in (out / "seed_0" / "logs" / "assistant.log").read_text()
    for seed in (0, 1):
        run = RunFolder(out / f"seed_{seed}")
        assert not run.stage("student").started and not run.stage("assistant").finished
        assert all(run.stage(s).finished for s in ("teacher", "student_kd", "student_scratch", "student_dkd"))


def test_a_stage_job_builds_its_method_once(tmp_path, monkeypatch):
    """The study's process checks, plans and times every stage before any job starts; the job's
    own process then builds its stage's method once, to train it (not once per check, probe and
    estimate of every stage of the config)."""
    from src.distillation import chain as chain_mod, stage as stage_mod
    cfg = tiny_cfg(stages=[{"name": "teacher", "model": "plain_cnn2", "role": "teacher"},
                           {"name": "student", "model": "plain_cnn2", "role": "student", "teacher": "teacher"}])
    plan = build_plan(cfg, RunFolder(tmp_path / "run"), threads=1)
    chain_mod.prepare_run(cfg, plan.root, False, 1)
    chain_mod.run_job(plan.job("teacher"))
    built = []
    real = stage_mod.build_method
    monkeypatch.setattr(stage_mod, "build_method", lambda *a, **k: built.append(a[1].name) or real(*a, **k))
    import src.distillation.methods as methods_mod
    monkeypatch.setattr(methods_mod, "build_method", lambda *a, **k: built.append(a[1].name) or real(*a, **k))
    chain_mod.run_job(plan.job("student"))
    assert built == ["student"]
