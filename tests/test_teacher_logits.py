"""A loaded teacher's logits on the training split are computed by the first stage that needs them
and read by the next (src/distillation/logits_cache.py): the student's weights are the same bit for
bit either way, and a damaged file is computed again."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

TEACHER = """name: tiny_teacher
seed: 0
deterministic: true
data: {source: digits, image_size: 16, max_train_samples: 300, max_test_samples: 60, augment: none}
train: {epochs: 2, batch_size: 32, lr: 0.003, device: cpu}
stages:
  - {name: teacher, model: plain_cnn4, role: teacher}
  - {name: student, model: plain_cnn2, role: student, teacher: teacher}
"""


def train(config: Path, out: Path) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "cnn_distillation.train_cnn", "--no-progress", "--threads", "1",
                           "--config", str(config), "--output-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def checksums(out: Path, stage: str = "student") -> list:
    return json.loads((out / stage / "stage.json").read_text())["rank_weight_checksums"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A chain that trains its teacher, and a config whose teacher is that checkpoint."""
    tmp = tmp_path_factory.mktemp("logits")
    (tmp / "a.yaml").write_text(TEACHER)
    a = tmp / "a"
    train(tmp / "a.yaml", a)
    (tmp / "b.yaml").write_text(TEACHER.replace("role: teacher}", f"role: teacher, checkpoint: {a / 'teacher' / 'best.pt'}}}"))
    return tmp, a


def test_the_second_stage_reads_what_the_first_computed_bit_for_bit(first):
    tmp, a = first
    cache = a / "teacher" / "teacher_logits"
    assert not cache.exists()  # a teacher trained in the run: nothing to share, nothing written
    text1 = train(tmp / "b.yaml", tmp / "b1")
    assert "computed once" in text1 and "read from teacher_logits/" not in text1
    files = list(cache.glob("*.pt"))
    assert len(files) == 1
    text2 = train(tmp / "b.yaml", tmp / "b2")
    assert "read from teacher_logits/" in text2 and "computed once" not in text2
    assert checksums(tmp / "b1") == checksums(tmp / "b2")
    # the same student as the chain that trained the teacher and computed the logits in memory
    assert checksums(tmp / "b1") == checksums(a)
    # a damaged file: computed again, the same weights, the file written anew
    files[0].write_bytes(files[0].read_bytes()[:100])
    text3 = train(tmp / "b.yaml", tmp / "b3")
    assert "computed once" in text3 and checksums(tmp / "b3") == checksums(tmp / "b1")
    assert files[0].stat().st_size > 100


def test_another_thread_count_or_teacher_file_is_another_key(first):
    """The key holds the teacher's file (size, modification time) and the thread count: a changed
    checkpoint is never answered with the old tables."""
    from types import SimpleNamespace
    import torch
    from src.distillation.logits_cache import key_of
    from src.spec.config import load_config
    tmp, a = first
    cfg = load_config(tmp / "b.yaml")
    loader = SimpleNamespace(labels=torch.arange(10), images=torch.zeros(10, 3, 4, 4, dtype=torch.uint8), batch_size=5)
    run = SimpleNamespace(cfg=cfg, method=SimpleNamespace(teacher_names=["teacher"]), device=torch.device("cpu"),
                          precision=SimpleNamespace(device_type="cpu", dtype=None), plan=SimpleNamespace(compile=False))
    k1 = key_of(run, loader)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert key_of(run, loader) != k1
    finally:
        torch.set_num_threads(threads)
    for name in ("best.pt", "model.safetensors"):  # the checkpoint, and the export a finished stage's best.pt names
        path = a / "teacher" / name
        assert path.is_file()
        k0 = key_of(run, loader)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert key_of(run, loader) != k0
    loader.images = loader.images + 1
    assert key_of(run, loader)["images"] != k1["images"]
    # a teacher that is not a stage folder's checkpoint (or none at all): no key, nothing shared
    run.method.teacher_names = ["student"]
    assert key_of(run, loader) is None
