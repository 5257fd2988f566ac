"""What a newcomer meets: evaluate on a --seeds run, help texts that end their sentences,
an installable project."""
import subprocess
import sys

import yaml

from src.distillation.config import to_dict
from tests.conftest import ROOT, run_cli, tiny_cfg


def test_evaluate_on_a_seeds_run_names_the_seed_and_the_data(tmp_path, capsys):
    from src.evaluate import main
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(tiny_cfg(train__epochs=1))))
    run = tmp_path / "run"
    code, err = run_cli("cnn", "--config", cfg, "--output-dir", run, "--seeds", "0,1")
    assert code == 0, err
    assert main([str(run), "--stage", "student", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "evaluating every seed (0, 1)" in out and out.count("seed 0: student") == 1 and "seed 1: student" in out
    for s in (0, 1):
        assert (run / f"seed_{s}" / "evaluations" / "student-test-digits" / "metrics.json").exists()
    assert main([str(run), "--stage", "student", "--seed", "1", "--out", str(tmp_path / "one"), "--device", "cpu"]) == 0
    assert (tmp_path / "one" / "metrics.json").exists()
    assert main([str(run), "--stage", "student", "--seed", "7", "--device", "cpu"]) == 2
    assert "holds seeds 0, 1" in capsys.readouterr().err


def test_benchmark_help_ends_its_sentences_and_gpu_session_has_help(tmp_path):
    for script in ("bench_accuracy.py", "bench_stages.py", "gpu_smoke.py", "profile_stage.py", "chaos.py",
                   "reproduce_takd.py"):
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                             text=True, cwd=tmp_path)
        assert res.returncode == 0, (script, res.stderr[-500:])
        description = res.stdout.split("\n\n")[1].replace("\n", " ").strip()
        assert description.endswith((".", ")", ":")) and description.count("(") == description.count(")"), \
            (script, description)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--help"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.returncode == 0 and "smoke" in res.stdout and "unknown step" not in res.stderr
