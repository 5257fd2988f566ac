"""What a newcomer meets: evaluate on a --seeds run, help texts that end their sentences,
an installable project."""
import subprocess
import sys

import pytest
import yaml

from src.spec.config import to_dict
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


def test_a_long_cpu_run_chosen_on_purpose_can_leave_out_the_gpu_advice(tmp_path, capsys, monkeypatch):
    """The reproduction's own long CPU chains pass --no-cpu-advice: advising its --slice cpu from
    inside its --slice cpu-full run misleads. Without the flag the advice stays."""
    from src.distillation import clock
    monkeypatch.setattr(clock, "SLOW_ON_CPU_S", 0.0)  # every chain counts as long
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(tiny_cfg(train__epochs=1))))
    said = {}
    for name, extra in (("advised", []), ("quiet", ["--no-cpu-advice"])):
        code, err = run_cli("cnn", "--config", cfg_path, "--output-dir", tmp_path / name, *extra)
        assert code == 0, err
        said[name] = capsys.readouterr().out
    assert "meant for a GPU" in said["advised"] and "Estimated training time" in said["advised"]
    assert "meant for a GPU" not in said["quiet"] and "Estimated training time" in said["quiet"]
    from types import SimpleNamespace
    from benchmarks import reproduce_takd
    started = []
    monkeypatch.setattr(reproduce_takd.cli, "run", lambda argv, *a, **kw: started.append(argv) or 0)
    args = SimpleNamespace(jobs=1, executor=None, ray_address=None, verbose=False, argv=[])
    reproduce_takd.train_run(tmp_path / "cfg.yaml", tmp_path / "child", args)
    assert "--no-cpu-advice" in started[0]


def test_an_epoch_resumed_part_way_counts_as_a_whole_one_for_the_clock():
    """After a resume at step 300 of 400, the process ran 100 steps: 50 s of training and 10 s of
    validation. A whole epoch is 4 x 50 + 10 s; an epoch run whole is taken as measured."""
    from src.distillation.clock import whole_epoch_seconds
    assert whole_epoch_seconds(60.0, 10.0, 400, 300) == 210.0
    assert whole_epoch_seconds(60.0, 10.0, 400, 0) == 60.0
    assert whole_epoch_seconds(60.0, 10.0, 400, 400) == 60.0  # nothing left to run: no scaling by zero


def test_durations_read_as_people_say_them():
    from src.distillation.clock import duration
    assert [duration(s) for s in (40, 14 * 60, 130 * 60)] == ["40 s", "14 min", "2 h 10 min"]


def test_swapping_the_chains_models_needs_no_other_flag_and_names_the_run_after_them():
    from src.experiment.session import named_after_its_chain
    from src.spec.config import load_config
    from src.models import create_model
    from src.models.factory import has_cifar_stem
    preset = ROOT / "cnn_distillation" / "configs" / "cifar10.yaml"
    swap = [f"stages.{s}.model={m}" for s, m in (("teacher", "plain_cnn10"), ("assistant", "plain_cnn4"),
                                                 ("student", "plain_cnn2"))]
    cfg = named_after_its_chain(load_config(preset, swap), load_config(preset))
    assert cfg.name == "cnn_cifar10-plain_cnn10-plain_cnn4-plain_cnn2"
    assert named_after_its_chain(load_config(preset), load_config(preset)).name == "cnn_cifar10"
    assert all(s.cifar_stem == "auto" for s in cfg.stages)  # the preset's stem follows the model
    assert not has_cifar_stem(create_model("plain_cnn4", 10, image_size=32, cifar_stem="auto"))
    assert has_cifar_stem(create_model("resnet18", 10, cifar_stem="auto"))
    assert not has_cifar_stem(create_model("resnet18", 10))
