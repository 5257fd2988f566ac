import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub traffic from tests


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # pytest -n N: the cores are shared out between the workers and the runs they start
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores() // _WORKERS))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, _cores()) // _WORKERS))  # the suite's tiny models: 2 threads at most


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """With pytest-xdist installed, on a machine without CUDA and with two cores or more, the suite
    runs in two worker processes, a test file per worker at a time (each module's fixtures built
    once), each with half the cores: on two cores about 6 minutes instead of 10. `-n 0` runs it in
    this one process (for --pdb or -s), `-n N` in N. On a GPU machine it stays in one process:
    the CUDA tests measure memory and share one device."""
    if (config.pluginmanager.hasplugin("xdist") and config.option.numprocesses is None
            and not os.environ.get("PYTEST_XDIST_WORKER") and not config.getoption("usepdb", False)
            and not config.getoption("collectonly") and not torch.cuda.is_available() and _cores() >= 2):
        config.option.numprocesses = 2
        if config.option.dist == "no":
            config.option.dist = "loadfile"


def pytest_collection_finish(session):
    """Everything imported by now lives as long as the suite: out of the collector's sight, the
    full collections the training code asks for between stages take milliseconds, not 0.3 s."""
    import gc
    gc.collect()
    gc.freeze()


_skip_without_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def requires_cuda(test):
    """GPU-only test: marked `gpu` (benchmarks/gpu_session.sh smoke runs `-m gpu`), skipped without CUDA."""
    return pytest.mark.gpu(_skip_without_cuda(test))


def tiny_cfg(**over):
    """A two-stage digits chain with tiny models: seconds on a CPU."""
    from src.spec.config import from_dict
    raw = {
        "name": "tiny", "seed": 0, "deterministic": True,
        "data": {"source": "digits", "image_size": 16, "max_train_samples": 160, "max_test_samples": 60,
                 "augment": "crop_flip", "crop_padding": 2},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.003, "device": "cpu"},
        "stages": [{"name": "teacher", "model": "resnet10t", "role": "teacher"},
                   {"name": "student", "model": "resnet10t", "role": "student", "teacher": "teacher",
                    "model_kwargs": {}}],
    }
    for key, value in over.items():
        node = raw
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return from_dict(raw)


def run_entry(chain: str, *args, timeout=600, cwd=None):
    """Run bash <chain>_distillation/train_<chain>.sh as a user would; returns CompletedProcess."""
    script = ROOT / f"{chain}_distillation" / f"train_{chain}.sh"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    return subprocess.run(["bash", str(script), "--no-progress", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=env)


def write_image(path: Path, mode: str = "RGB", size=(12, 12), seed: int = 0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture
def image_tree(tmp_path):
    """train/ and test/ with 2 classes x a few 12x12 PNGs."""
    root = tmp_path / "tree"
    for split, n in (("train", 10), ("test", 3)):
        for c in ("cat", "dog"):
            for i in range(n):
                write_image(root / split / c / f"{i}.png", seed=hash((split, c, i)) % 1000)
    return root


def run_cli(chain: str, *args, monkeypatch=None):
    """The entry point in-process (same code as the shell script minus the interpreter start):
    returns (exit code, stderr text)."""
    import contextlib
    import io
    from src.experiment.cli import run
    default = ROOT / f"{chain}_distillation" / "configs" / "cifar10.yaml"
    err = io.StringIO()
    cwd = os.getcwd()
    try:
        with contextlib.redirect_stderr(err):
            code = run(["--no-progress", *map(str, args)], chain, default)
    finally:
        os.chdir(cwd)
    return code, err.getvalue()


def validate(runs: Path, monkeypatch, capsys):
    """validate_project.py --runs RUNS in this process: (exit code, printed text). The guards'
    self-test, a process of its own, is left out (tests/test_guards.py runs that script)."""
    import validate_project
    monkeypatch.setattr(validate_project, "check_self_test", lambda: "not run here")
    capsys.readouterr()
    code = validate_project.main(["--runs", str(runs)])
    return code, capsys.readouterr().out
