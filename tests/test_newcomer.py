"""What a newcomer meets: evaluate on a --seeds run, help texts that end their sentences,
an installable project."""
import subprocess
import sys

import pytest
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
    import contextlib
    import io
    import runpy
    for script in ("bench_accuracy.py", "bench_stages.py", "gpu_smoke.py", "profile_stage.py", "chaos.py",
                   "reproduce_takd.py"):  # in this process: --help exits before anything runs
        out = io.StringIO()
        argv = sys.argv
        try:
            sys.argv = [script, "--help"]
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
                runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
        finally:
            sys.argv = argv
        assert done.value.code in (0, None), script
        description = out.getvalue().split("\n\n")[1].replace("\n", " ").strip()
        assert description.endswith((".", ")", ":")) and description.count("(") == description.count(")"), \
            (script, description)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--help"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.returncode == 0 and "smoke" in res.stdout and "unknown step" not in res.stderr


def test_the_chain_says_how_long_it_will_take_before_its_first_step(tmp_path, capsys, monkeypatch):
    from src.distillation import clock
    from src.distillation.chain import run_chain
    from tests.conftest import tiny_cfg
    monkeypatch.setattr(clock, "SLOW_ON_CPU_S", 0.0)  # every chain counts as long: the CPU advice must appear
    run_chain(tiny_cfg(train__epochs=2), tmp_path / "run", progress=False, later_seeds=2)
    out = capsys.readouterr().out
    estimate = out.index("Estimated training time: about")
    assert estimate < out.index("epoch   1/2")
    line = out[estimate:].splitlines()[0]
    assert "teacher" in line and "student" in line and "2 more seeds" in line
    assert "meant for a GPU" in out and "demo.yaml" in out and "reproduce_takd.py --slice cpu" in out
    epoch_lines = [ln for ln in out.splitlines() if " epoch " in ln and "/2 " in ln]
    assert len(epoch_lines) == 4 and all("chain ~" in ln and "left" in ln for ln in epoch_lines)


def test_durations_read_as_people_say_them():
    from src.distillation.clock import duration
    assert [duration(s) for s in (40, 14 * 60, 130 * 60)] == ["40 s", "14 min", "2 h 10 min"]
