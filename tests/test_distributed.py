"""DistributedDataParallel on CPU with gloo: two ranks launched by torchrun through --gpus 2."""
import json

import pytest
import yaml

from src.spec.config import to_dict
from src.utils.logger import REQUIRED_COLUMNS, read_epoch_csv
from tests.conftest import run_entry, tiny_cfg

pytestmark = pytest.mark.slow


def test_two_ranks_write_once_and_end_with_identical_weights(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(tiny_cfg(train__epochs=2))))
    out = tmp_path / "run"
    res = run_entry("cnn", "--config", cfg_path, "--output-dir", out, "--gpus", 2, "--device", "cpu")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in ("teacher", "student"):
        text = (out / stage / "epoch_log.csv").read_text().splitlines()
        assert text[0] == ",".join(REQUIRED_COLUMNS) and text.count(text[0]) == 1  # written by one rank only
        assert [int(r["epoch"]) for r in read_epoch_csv(out / stage / "epoch_log.csv")] == [1, 2]
        info = json.loads((out / stage / "stage.json").read_text())
        assert info["world_size"] == 2
        sums = info["rank_weight_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1]  # each rank hashed its own weights
    assert res.stdout.count("✅ Done.") == 1  # one voice


def test_single_process_run_reports_world_size_one(tmp_path):
    from src.distillation.chain import run_chain
    run_chain(tiny_cfg(train__epochs=1), tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "student" / "stage.json").read_text())
    assert info["world_size"] == 1 and len(info["rank_weight_checksums"]) == 1


def test_fitnet_regressor_is_averaged_across_ranks(tmp_path):
    """A method with its own trainable modules (the FitNets regressor) trains in one module with
    the student under DDP: both ranks end with the same student and regressor (hashed together)."""
    stages = [{"name": "teacher", "model": "resnet10t", "role": "teacher"},
              {"name": "student", "model": "resnet10t", "role": "student", "teacher": "teacher", "method": "fitnet"}]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(tiny_cfg(train__epochs=1, stages=stages))))
    out = tmp_path / "run"
    res = run_entry("cnn", "--config", cfg_path, "--output-dir", out, "--gpus", 2, "--device", "cpu")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    info = json.loads((out / "student" / "stage.json").read_text())
    assert info["world_size"] == 2 and info["method"] == "fitnet"
    sums = info["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]


def test_sigterm_to_the_gpus_launcher_reaches_its_ranks_and_leaves_no_process(tmp_path):
    """--gpus N relaunches under torchrun: SIGTERM to the command it was started as is passed on,
    the ranks save and stop, and nothing keeps training (before, the launcher died silently and
    left the ranks training, orphaned, holding the lock)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from tests.conftest import ROOT
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(tiny_cfg(train__epochs=30, data__max_train_samples=600))))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cnn_distillation.train_cnn", "--no-progress", "--config", str(cfg_path),
                             "--output-dir", str(out), "--gpus", "2", "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, t0 = out / "teacher" / "epoch_log.csv", time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= 2) and time.time() - t0 < 300:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "--resume" in text, text[-3000:]
    time.sleep(1)
    left = [p for p in os.listdir("/proc") if p.isdigit() and str(out).encode() in
            open(f"/proc/{p}/cmdline", "rb").read()] if os.path.isdir("/proc") else []
    assert not left, f"still running: {left}"
