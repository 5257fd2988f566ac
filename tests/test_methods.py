"""The method seam: a new distillation method is one file plus config, and the built-in ones
compute what they claim (checked against the test's own float64 arithmetic)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from src.distillation.chain import run_chain
from src.distillation.methods import KD, Dense, Scratch, resolve
from src.utils.errors import ConfigError
from tests.conftest import ROOT, run_cli, tiny_cfg

def readme_method() -> str:
    """The documented "A method of your own" example (docs/methods.md), as a reader would paste it."""
    text = (ROOT / "docs" / "methods.md").read_text()
    section = text[text.index("# A method of your own"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


TOY = readme_method()


def test_a_new_method_in_one_file_trains_a_chain_and_logs_its_terms(tmp_path):
    (tmp_path / "mean_prob_kd.py").write_text(TOY)
    stages = [{"name": "t1", "model": "resnet10t", "role": "teacher"},
              {"name": "t2", "model": "resnet10t", "role": "teacher", "seed_stream": "other"},
              {"name": "student", "model": "resnet10t", "role": "student", "teacher": ["t1", "t2"],
               "method": f"{tmp_path / 'mean_prob_kd.py'}:MeanProbKD"}]
    cfg = tiny_cfg(stages=stages, train__epochs=2)
    run = tmp_path / "run"
    run_chain(cfg, run, progress=False)
    terms = pd.read_csv(run / "student" / "epoch_terms.csv")
    assert list(terms.columns[:4]) == ["epoch", "train_ce", "train_kd", "train_teacher_entropy"]
    assert terms["train_teacher_entropy"].notna().all() and (terms["train_teacher_entropy"] > 0).all()
    log = pd.read_csv(run / "student" / "epoch_log.csv")
    a = terms["alpha"]
    np.testing.assert_allclose(log["train_loss"], (1 - a) * terms["train_ce"] + a * terms["train_kd"], rtol=1e-5)
    info = json.loads((run / "student" / "stage.json").read_text())
    assert info["teachers"] == ["t1", "t2"] and info["teacher"] == "t1+t2"
    assert info["method"] == "MeanProbKD" and info["method_label"] == "MeanProbKD from t1 + t2"
    sched = pd.read_csv(run / "student" / "schedule.csv")
    assert list(sched["step"]) == list(range(1, len(sched) + 1)) and set(sched["epoch"]) == {1, 2}
    assert sched.groupby("epoch")["alpha"].nunique().eq(1).all()


def _logits(seed, n=6, c=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * 3


def _kl_t2(s, t, T):
    """T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean, in float64 by hand."""
    p, q = F.softmax(t / T, 1), F.softmax(s / T, 1)
    return float((p * (p.log() - q.log())).sum(1).mean() * T * T)


def test_dense_kd_term_is_the_weighted_sum_of_single_teacher_terms():
    s, ts, T = _logits(0), [_logits(1), _logits(2), _logits(3)], 3.0
    dense = Dense([torch.nn.Identity()] * 3, temperature=T, weights=[1.0, 0.5, 2.0])
    got = float(dense.distill(s.float(), [t.float() for t in ts]))
    want = sum(w * _kl_t2(s, t, T) for w, t in zip([1.0, 0.5, 2.0], ts))
    assert got == pytest.approx(want, rel=1e-5)
    single = KD([torch.nn.Identity()], temperature=T)
    assert float(single.distill(s.float(), [ts[0].float()])) == pytest.approx(_kl_t2(s, ts[0], T), rel=1e-5)


def test_dropped_teachers_follow_k_over_n_and_resume_with_the_same_draws():
    n, k, batches = 4, 1, 4000
    dense = Dense([torch.nn.Identity()] * n, drop_teachers=k, seed=7)
    dropped = np.zeros(n)
    for _ in range(batches):
        dense.begin_batch()
        assert len(dense.active_teachers()) == n - k
        for i in set(range(n)) - set(dense.active_teachers()):
            dropped[i] += 1
    freq = dropped / batches
    assert np.all(np.abs(freq - k / n) < 4 * np.sqrt(k / n * (1 - k / n) / batches))  # within 4 standard errors
    state = dense.state_dict()
    again = Dense([torch.nn.Identity()] * n, drop_teachers=k, seed=0)
    again.load_state_dict(state)
    for _ in range(20):
        dense.begin_batch()
        again.begin_batch()
        assert dense.active_teachers() == again.active_teachers()


def test_methods_refuse_the_wrong_number_of_teachers_and_unknown_names():
    with pytest.raises(ConfigError, match="exactly 1"):
        KD([torch.nn.Identity()] * 2)
    with pytest.raises(ConfigError, match="0"):
        Scratch([torch.nn.Identity()])
    with pytest.raises(ConfigError, match="drop_teachers"):
        Dense([torch.nn.Identity()] * 2, drop_teachers=2)
    with pytest.raises(ConfigError, match="not known"):
        resolve("no_such_method")
    with pytest.raises(ConfigError, match="file not found"):
        resolve("/nonexistent/m.py:Cls")


def _method_cfg(tmp_path, source: str, cls: str = "MeanProbKD"):
    import yaml
    from src.spec.config import to_dict
    (tmp_path / "m.py").write_text(source)
    stages = [{"name": "teacher", "model": "resnet10t", "role": "teacher"},
              {"name": "student", "model": "resnet10t", "role": "student", "teacher": "teacher",
               "method": f"{tmp_path / 'm.py'}:{cls}"}]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_cfg(stages=stages, train__epochs=1))))
    return path


@pytest.mark.parametrize("source, cls, words", [
    (TOY.replace("import torch\nimport torch.nn.functional as F\n", ""), "MeanProbKD", "NameError"),  # as once pasted
    (TOY, "MeanProbKd", "MeanProbKd is not a Method subclass"),
    (TOY.replace("min_teachers = 1", "min_teachers = 2"), "MeanProbKD", "takes at least 2 teacher(s), got 1"),
])
def test_a_broken_method_is_refused_before_the_teacher_trains_and_leaves_no_folder(tmp_path, source, cls, words):
    out = tmp_path / "run"
    code, err = run_cli("cnn", "--config", _method_cfg(tmp_path, source, cls), "--output-dir", out)
    assert code == 2 and words in err and "stage 'student'" in err, err
    assert not out.exists()  # the teacher never trained, and the refused start left no folder


@pytest.mark.parametrize("args, words", [
    (["--set", "stages.teacher.model=resnet_does_not_exist"], "unknown timm model"),        # model
    (["--set", "stages.teacher.cifar_stem=true", "--set", "stages.teacher.model=plain_cnn4"], "cifar_stem: auto"),
    (["--set", "train.no_such_key=1"], "unknown config key"),                                # config
    (["--data-source", "imagefolder", "--data-root", "/nonexistent/tree"], "/nonexistent/tree"),  # data
])
def test_every_refused_start_leaves_no_folder(tmp_path, args, words):
    out = tmp_path / "run"
    code, err = run_cli("cnn", "--config", _method_cfg(tmp_path, TOY), "--output-dir", out, *args)
    assert code == 2 and words in err, err
    assert not out.exists()
    code, err = run_cli("cnn", "--config", _method_cfg(tmp_path, TOY), "--output-dir", out, "--epochs", "1")
    assert code == 0, err  # the same --output-dir is free for the corrected command


def test_a_resume_refuses_a_method_file_changed_since_the_run_started(tmp_path):
    from src.spec.config import load_config
    from src.utils.errors import UserError
    cfg_path = _method_cfg(tmp_path, TOY)
    run = tmp_path / "run"
    run_chain(load_config(cfg_path), run, progress=False)
    info = json.loads((run / "student" / "stage.json").read_text())
    import hashlib
    assert info["method_file"] == str(tmp_path / "m.py")
    assert info["method_sha256"] == hashlib.sha256((tmp_path / "m.py").read_bytes()).hexdigest()
    assert json.loads((run / "env.json").read_text())["methods"]["student"]["sha256"] == info["method_sha256"]
    run_chain(load_config(cfg_path), run, resume=True, progress=False)  # unchanged: resumes (nothing left to do)
    (tmp_path / "m.py").write_text(TOY.replace("* T * T", "* T"))
    with pytest.raises(UserError, match="m.py changed since this run started"):
        run_chain(load_config(cfg_path), run, resume=True, progress=False)
