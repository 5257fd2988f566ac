"""The methods a distillation researcher compares against (DKD, DIST, FitNets, AT), each term
checked against an independent float64 computation of its published formula, and the seam that
lets them see labels, epochs and features."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from src.distillation.chain import run_chain
from src.distillation.methods import available, resolve, stage_outputs
from src.utils.checkpoint import read_weights
from src.utils.errors import ConfigError
from tests.conftest import tiny_cfg

T = 4.0


def _fixed(b=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g) * 3, torch.randn(b, c, generator=g) * 3, torch.randint(0, c, (b,), generator=g))


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _kl(p, q):  # KL(p || q) per row
    return (p * (np.log(p) - np.log(q))).sum(1)


def test_dkd_matches_its_formula_in_float64():
    s, t, y = _fixed()
    zs, zt, yy = s.double().numpy(), t.double().numpy(), y.numpy()
    ps, pt = _softmax(zs / T), _softmax(zt / T)
    rows = np.arange(len(yy))
    bs = np.stack([ps[rows, yy], 1 - ps[rows, yy]], 1)  # exact in float64 at these small margins
    bt = np.stack([pt[rows, yy], 1 - pt[rows, yy]], 1)
    tckd = _kl(bt, bs).mean() * T * T
    keep = np.ones_like(zs, bool)
    keep[rows, yy] = False
    qs = np.stack([_softmax(zs[i][keep[i]][None] / T)[0] for i in rows])
    qt = np.stack([_softmax(zt[i][keep[i]][None] / T)[0] for i in rows])
    nckd = _kl(qt, qs).mean() * T * T
    method = resolve("dkd")([nn.Identity()], ["teacher"], temperature=T)
    method.begin_epoch(5, 100)
    out = method.loss(s, y, [t], alpha=0.123)  # the chain's alpha is not DKD's
    ce = -np.log(_softmax(zs)[rows, yy]).mean()
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert out["kd"].item() == pytest.approx(1.0 * tckd + 8.0 * nckd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce + (5 / 20) * (tckd + 8 * nckd), rel=1e-5)  # warm-up 5 of 20


def test_dkd_warm_up_follows_the_epoch():
    method = resolve("dkd")([nn.Identity()], ["teacher"], warmup=20)
    weights = []
    for epoch in (1, 10, 20, 40):
        method.begin_epoch(epoch, 40)
        weights.append(method.weights())
    assert weights == [(1.0, 0.05), (1.0, 0.5), (1.0, 1.0), (1.0, 1.0)]  # mdistiller's epoch / 20 at each epoch's end


def test_dkd_warm_up_equals_mdistillers_staircase_at_every_batch():
    """mdistiller: min(epoch / warmup, 1) for the whole of epoch `epoch` (1-based), batch by batch."""
    method = resolve("dkd")([nn.Identity()], ["teacher"], warmup=20)
    for epoch in (1, 5, 19, 20, 21):
        for batch in (0, 49, 99):
            method.begin_epoch(epoch, 240)
            method.begin_step(batch, 100)
            assert method.weights()[1] == min(epoch / 20, 1.0), (epoch, batch)


def test_dkd_warm_up_of_a_fraction_of_an_epoch_is_a_finer_staircase():
    """1.25 epochs of 15 (the paper's 20 of 240): steps of a quarter epoch, 0.2 ... 1.0; the weight
    starts at 1/5, not at full weight, and reaches 1 a quarter into the second epoch."""
    method = resolve("dkd")([nn.Identity()], ["teacher"], warmup=1.25)
    kd = {}
    for epoch, batch in ((1, 0), (1, 24), (1, 25), (1, 99), (2, 24), (2, 25), (3, 0)):
        method.begin_epoch(epoch, 15)
        method.begin_step(batch, 100)
        kd[epoch, batch] = method.weights()[1]
    assert kd[1, 0] == kd[1, 24] == pytest.approx(0.2) and kd[1, 25] == pytest.approx(0.4)
    assert kd[1, 99] == pytest.approx(0.8) and kd[2, 24] == pytest.approx(1.0) and kd[2, 25] == kd[3, 0] == 1.0


@pytest.mark.parametrize("margin", [0, 30, 60, 90])
def test_dkd_tckd_is_exact_at_large_margins(margin):
    """The student's target logit `margin` above the others, at T = 4: TCKD against a float64
    computation (1 - p(target) in float32 is off by 1% at 60 and by 40% at 70)."""
    c = 10
    s = torch.zeros(2, c)
    s[:, 0] = margin
    s[1, 1:] = torch.linspace(-1, 1, c - 1)
    t = torch.randn(2, c, generator=torch.Generator().manual_seed(4)) * 2
    y = torch.zeros(2, dtype=torch.long)
    from src.distillation.methods.dkd import dkd_terms
    tckd, _ = dkd_terms(s, t, y, 4.0)
    zs, zt = s.double().numpy() / 4, t.double().numpy() / 4
    ps, pt = _softmax(zs), _softmax(zt)
    bs = np.stack([ps[:, 0], ps[:, 1:].sum(1)], 1)
    bt = np.stack([pt[:, 0], pt[:, 1:].sum(1)], 1)
    expected = _kl(bt, bs).mean() * 16
    assert tckd.item() == pytest.approx(expected, rel=1e-4)


def test_methods_use_their_references_defaults_not_the_chains_temperature():
    """DKD and DIST at their references' T = 4 whatever kd.temperature says (KD's setting); DIST's
    weight 2 (dist_cifar.yaml); a stage's method_args.temperature wins."""
    from src.distillation.methods import build_method
    cfg = tiny_cfg(kd__temperature=5.0, stages=[{"name": "teacher", "model": "plain_cnn2"},
                                                {"name": "s", "model": "plain_cnn2", "teacher": "teacher", "method": "dist"},
                                                {"name": "d", "model": "plain_cnn2", "teacher": "teacher", "method": "dkd"},
                                                {"name": "k", "model": "plain_cnn2", "teacher": "teacher"},
                                                {"name": "t", "model": "plain_cnn2", "teacher": "teacher",
                                                 "method": "dist", "method_args": {"temperature": 2}}])
    built = {s.name: build_method(cfg, s, [nn.Identity()]) for s in cfg.stages[1:]}
    assert (built["s"].temperature, built["s"].kd_weight, built["s"].beta, built["s"].gamma) == (4.0, 2.0, 1.0, 1.0)
    assert (built["d"].temperature, built["d"].alpha, built["d"].beta, built["d"].warmup) == (4.0, 1.0, 8.0, 20.0)
    assert built["k"].temperature == 5.0 and built["t"].temperature == 2.0


def test_dist_matches_its_formula_in_float64():
    s, t, y = _fixed(b=7, c=6, seed=1)
    ys, yt = _softmax(s.double().numpy() / T), _softmax(t.double().numpy() / T)
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(len(ys))])
    intra = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(ys.shape[1])])
    method = resolve("dist")([nn.Identity()], ["teacher"], temperature=T)
    out = method.loss(s, y, [t], alpha=0.5)
    assert out["inter"].item() == pytest.approx(inter * T * T, rel=1e-4)
    assert out["intra"].item() == pytest.approx(intra * T * T, rel=1e-4)
    ce = -np.log(_softmax(s.double().numpy())[np.arange(len(y)), y.numpy()]).mean()
    assert out["loss"].item() == pytest.approx(ce + 2 * (inter + intra) * T * T, rel=1e-4)  # the authors' weight 2


class _TwoStages(nn.Module):
    """A small CNN with two named stages (16 px -> 8 px -> 4 px)."""

    def __init__(self, width=4, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


class _Eager:
    @staticmethod
    def autocast():
        import contextlib
        return contextlib.nullcontext()


def test_stage_outputs_are_the_last_module_of_each_size():
    assert stage_outputs(_TwoStages(), 16) == ["stem", "stage1", "stage2"]


def test_attention_transfer_matches_its_formula_in_float64():
    torch.manual_seed(0)
    student, teacher = _TwoStages(4).double(), _TwoStages(6).double().eval()
    method = resolve("at")([teacher], ["teacher"], student=student, image_size=16).double()
    assert method.features == {"student": ["stem", "stage1", "stage2"], "teacher": ["stem", "stage1", "stage2"]}
    x, y = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2])
    logits, out = method.step(student, x, y, 0.5, _Eager)
    with torch.no_grad():
        fs = [student.stem(x)]
        fs += [student.stage1(fs[-1])]
        fs += [student.stage2(fs[-1])]
        ft = [teacher.stem(x)]
        ft += [teacher.stage1(ft[-1])]
        ft += [teacher.stage2(ft[-1])]

    def at(f):
        a = (f.numpy() ** 2).mean(1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    expected = sum(((at(a) - at(b)) ** 2).mean() for a, b in zip(fs, ft))
    assert out["kd"].item() == pytest.approx(expected, rel=1e-5)
    ce = nn.functional.cross_entropy(logits, y).item()
    assert out["loss"].item() == pytest.approx(ce + 1000 * expected, rel=1e-5)


def test_fitnet_hint_matches_its_formula_in_float64():
    torch.manual_seed(0)
    student, teacher = _TwoStages(4).double(), _TwoStages(6).double().eval()
    method = resolve("fitnet")([teacher], ["teacher"], student=student, image_size=16).double()
    assert method.features == {"student": ["stage1"], "teacher": ["stage1"]}  # the middle stage
    assert method.regressor[0].weight.shape == (6, 4, 1, 1)  # sized from the student's and teacher's channels
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    _, out = method.step(student, x, y, 0.5, _Eager)
    with torch.no_grad():
        fs = student.stage1(student.stem(x)).numpy()
        ft = teacher.stage1(teacher.stem(x)).numpy()
    w = method.regressor[0].weight.detach().numpy()[:, :, 0, 0]
    r = np.einsum("oc,bchw->bohw", w, fs)
    mu, var = r.mean((0, 2, 3), keepdims=True), r.var((0, 2, 3), keepdims=True)  # batch norm in training mode
    bn = method.regressor[1]
    r = (r - mu) / np.sqrt(var + bn.eps) * bn.weight.detach().numpy()[None, :, None, None] \
        + bn.bias.detach().numpy()[None, :, None, None]
    r = np.maximum(r, 0)
    assert out["kd"].item() == pytest.approx(((r - ft) ** 2).mean(), rel=1e-6)


def test_methods_are_found_by_name_from_their_package():
    assert {"dkd", "dist", "fitnet", "at", "kd", "dense", "scratch"} <= set(available())
    with pytest.raises(ConfigError, match="have .*dkd"):
        resolve("dkdd")


@pytest.mark.parametrize("method", ["dkd", "dist", "fitnet", "at"])
def test_each_method_trains_a_chain_and_says_what_it_did(method, tmp_path, capsys):
    cfg = tiny_cfg(train__epochs=2, data__augment="none",
                   stages=[{"name": "teacher", "model": "resnet10t", "role": "teacher"},
                           {"name": "student", "model": "resnet10t", "role": "student", "teacher": "teacher",
                            "method": method, "method_args": {"warmup": 1} if method == "dkd" else {}}])
    run_chain(cfg, tmp_path / "run", progress=False)
    epoch_lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("student ")]
    kd_w = {"dkd": 1, "dist": 2, "fitnet": 100, "at": 1000}[method]  # the published weights
    assert len(epoch_lines) == 2 and all(f"ce 1 + {method} {kd_w:g} " in ln and "alpha" not in ln
                                         for ln in epoch_lines), epoch_lines  # the method's own mix, not alpha
    info = json.loads((tmp_path / "run" / "student" / "stage.json").read_text())
    assert info["method"] == method and info["method_label"].startswith(method)
    if method == "dkd":  # the method's own words reach stage.json, not the chain's
        assert info["method_label"] == "dkd from teacher (T 4, alpha 1, beta 8, warm-up 1 epochs)"
    assert info["method_file"].endswith(f"methods/{method}.py") and len(info["method_sha256"]) == 64
    terms = pd.read_csv(tmp_path / "run" / "student" / "epoch_terms.csv")
    assert np.isfinite(terms["train_kd"]).all() and (terms["train_kd"] > 0).all()
    parts = {"dkd": ("train_tckd", "train_nckd"), "dist": ("train_inter", "train_intra")}.get(method, ())
    assert all(np.isfinite(terms[p]).all() for p in parts)  # the logged parts of the term, per epoch
    if method in ("fitnet", "at"):  # the teachers' features are needed: no logit cache
        assert not info.get("teacher_cache_seconds")


def test_fitnet_resumes_mid_epoch_to_the_same_weights_and_regressor(tmp_path):
    from src.distillation.engine import StopRequested
    stages = [{"name": "teacher", "model": "resnet10t", "role": "teacher"},
              {"name": "student", "model": "resnet10t", "role": "student", "teacher": "teacher", "method": "fitnet"}]
    cfg = tiny_cfg(train__epochs=2, data__max_train_samples=480, stages=stages)
    run_chain(cfg, tmp_path / "full", progress=False)
    calls = {"n": 0}

    def stop_mid_student_epoch_1():
        if (tmp_path / "cut" / "teacher" / "stage.json").exists():
            calls["n"] += 1
        return calls["n"] > 5
    with pytest.raises(StopRequested):
        run_chain(cfg, tmp_path / "cut", progress=False, should_stop=stop_mid_student_epoch_1)
    run_chain(cfg, tmp_path / "cut", resume=True, progress=False)
    a = read_weights(tmp_path / "full" / "student" / "best.pt")
    b = read_weights(tmp_path / "cut" / "student" / "best.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sums = [json.loads((tmp_path / r / "student" / "stage.json").read_text())["rank_weight_checksums"] for r in ("full", "cut")]
    assert sums[0] == sums[1]  # student and regressor at the end of training, hashed together
    assert (tmp_path / "cut" / "student" / "epoch_log.csv").read_text().split("\n")[1].split(",")[:3] == \
        (tmp_path / "full" / "student" / "epoch_log.csv").read_text().split("\n")[1].split(",")[:3]


def test_a_feature_method_on_a_vit_is_refused_before_anything_trains(tmp_path):
    cfg = tiny_cfg(stages=[{"name": "teacher", "model": "vit_tiny_patch16_224", "role": "teacher", "patch_size": 4,
                            "model_kwargs": {"depth": 1, "embed_dim": 24, "num_heads": 2}},
                           {"name": "student", "model": "vit_tiny_patch16_224", "role": "student", "teacher": "teacher",
                            "patch_size": 4, "model_kwargs": {"depth": 1, "embed_dim": 24, "num_heads": 2},
                            "method": "fitnet"}])
    with pytest.raises(ConfigError, match="needs feature maps"):
        run_chain(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "teacher").exists()


def test_methods_option_compares_every_method_direct_and_via_the_assistant(tmp_path):
    """--methods dkd,at on a teacher -> assistant -> student chain: each method's student from the
    teacher and via the assistant, the scratch and direct-KD students, one seed stream, and the
    report compares them."""
    import yaml

    from src.spec.config import to_dict
    from tests.conftest import run_entry
    stages = [{"name": "teacher", "model": "resnet10t", "role": "teacher"},
              {"name": "assistant", "model": "resnet10t", "role": "assistant", "teacher": "teacher"},
              {"name": "student", "model": "resnet10t", "role": "student", "teacher": "assistant"}]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(tiny_cfg(train__epochs=1, stages=stages))))
    out = tmp_path / "run"
    res = run_entry("cnn", "--config", cfg_path, "--output-dir", out, "--methods", "dkd,at")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["stage"]) == {"teacher", "assistant", "student", "student_kd", "student_scratch", "student_dkd",
                                     "student_at", "student_dkd_via_assistant", "student_at_via_assistant"}
    students = summary[summary["role"] == "student"]
    assert set(students["seed_stream"]) == {"student"}  # every student starts from the same weights
    methods = dict(zip(summary["stage"], summary["method"]))
    assert methods["student_dkd_via_assistant"] == "dkd" and methods["student_at"] == "at"
    diffs = pd.read_csv(out / "report_differences.csv")
    text = diffs.to_csv()
    assert "DKD via assistant − DKD via teacher" in text and "AT via assistant − AT via teacher" in text
    assert (out / "figures" / "methods.png").exists()


def test_an_unknown_method_in_methods_is_refused_before_anything_is_written(tmp_path):
    from tests.conftest import run_cli
    from tests.conftest import ROOT
    code, err = run_cli("cnn", "--config", ROOT / "cnn_distillation/configs/demo.yaml", "--output-dir", tmp_path / "run",
                        "--methods", "dkd,dsit")
    assert code == 2 and "dsit" in err and "dist" in err
    assert not (tmp_path / "run").exists()


def _ce(z, y):  # cross-entropy per row, float64
    return -np.log(_softmax(z)[np.arange(len(y)), y])


@pytest.mark.parametrize("variant", ["hard", "soft"])
def test_deit_matches_its_formula_in_float64(variant):
    """Class head against the labels, distillation head against the teacher (its argmax when hard,
    tau^2 KL at tau 3 over batch x classes when soft, as the authors' losses.py), weighted 1/2 + 1/2
    (hard) or 0.9 + 0.1 (soft), the paper's defaults."""
    cls, t, y = _fixed(b=7, c=6, seed=2)
    dist = torch.randn(7, 6, generator=torch.Generator().manual_seed(3)) * 3
    zc, zd, zt, yy = cls.double().numpy(), dist.double().numpy(), t.double().numpy(), y.numpy()
    if variant == "hard":
        kd, (ce_w, kd_w) = _ce(zd, zt.argmax(1)).mean(), (0.5, 0.5)
    else:
        # the authors' scale: the KL summed over batch and classes, divided by batch x classes
        kd, (ce_w, kd_w) = _kl(_softmax(zt / 3.0), _softmax(zd / 3.0)).sum() * 9.0 / zd.size, (0.9, 0.1)
    ce = _ce(zc, yy).mean()
    method = resolve("deit")([nn.Identity()], ["teacher"], temperature=T, variant=variant)
    method._batch_features = {"student": [cls, dist], "teacher": []}  # what the seam's hooks on the two heads give
    averaged = (cls + dist) / 2
    out = method.loss(averaged, y, [t], alpha=0.77)  # the chain's alpha is not DeiT's
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce_w * ce + kd_w * kd, rel=1e-5)


_DEIT_TINY = {"patch_size": 4, "model_kwargs": {"depth": 1, "embed_dim": 24, "num_heads": 2}}


def test_deit_trains_a_distilled_vit_from_a_cnn_teacher_and_tests_on_both_heads(tmp_path):
    cfg = tiny_cfg(train__epochs=2, data__augment="none",
                   stages=[{"name": "teacher", "model": "resnet10t", "role": "teacher"},
                           {"name": "student", "model": "deit_tiny_distilled_patch16_224", "role": "student",
                            "teacher": "teacher", "method": "deit", **_DEIT_TINY}])
    run_chain(cfg, tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "student" / "stage.json").read_text())
    assert info["method"] == "deit" and info["method_label"] == "deit (hard) from teacher (weight 0.5)"
    terms = pd.read_csv(tmp_path / "run" / "student" / "epoch_terms.csv")
    assert np.isfinite(terms["train_kd"]).all() and np.isfinite(terms["train_ce"]).all()
    # the class head learns from the labels only, the distillation head from the teacher only
    from src.models.factory import create_model
    student = create_model("deit_tiny_distilled_patch16_224", 10, image_size=16, patch_size=4,
                           model_kwargs=_DEIT_TINY["model_kwargs"])
    teacher = create_model("resnet10t", 10).eval()
    method = resolve("deit")([teacher], ["teacher"], student=student)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])

    class _Eager:
        @staticmethod
        def autocast():
            import contextlib
            return contextlib.nullcontext()
    logits, terms = method.step(student.train(), x, y, 0.5, _Eager)
    heads = [student.head.weight, student.head_dist.weight]
    ce_grads = torch.autograd.grad(terms["ce"], heads, retain_graph=True, allow_unused=True)
    kd_grads = torch.autograd.grad(terms["kd"], heads, allow_unused=True)
    assert ce_grads[0].abs().sum() > 0 and (ce_grads[1] is None or not ce_grads[1].any())
    assert kd_grads[1].abs().sum() > 0 and (kd_grads[0] is None or not kd_grads[0].any())
    student.eval()  # tested on the mean of the two heads, as the paper does
    seen = {}
    for name in ("head", "head_dist"):
        getattr(student, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    with torch.no_grad():
        assert torch.allclose(student(x), (seen["head"] + seen["head_dist"]) / 2, atol=1e-6)


def test_deit_on_a_student_without_a_distillation_token_is_refused_before_anything_trains(tmp_path):
    cfg = tiny_cfg(stages=[{"name": "teacher", "model": "resnet10t", "role": "teacher"},
                           {"name": "student", "model": "vit_tiny_patch16_224", "role": "student", "teacher": "teacher",
                            "method": "deit", **_DEIT_TINY}])
    with pytest.raises(ConfigError, match="distillation token"):
        run_chain(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "teacher").exists()


def test_the_estimate_times_each_student_as_it_will_train(tmp_path, monkeypatch):
    """Inputs the same every epoch: a logit method's probe reads cached logits (the run caches
    them), a feature method's probe runs the teacher's forward at every step (the run cannot cache
    it), and each probe times the stage's own method, not a scratch student."""
    import src.distillation.chain as chain
    probed = {}

    def fake_measure(model, teachers, micro, *a, method=None, **k):
        probed[method.describe().split(" ")[0]] = (method.cached is not None, len(method.teachers))
        return {"img_per_s": 1e4, "peak_reserved_gib": 0.0}
    monkeypatch.setattr(chain, "measure_steps", fake_measure)
    cfg = tiny_cfg(train__epochs=1, data__augment="none",
                   stages=[{"name": "teacher", "model": "resnet10t", "role": "teacher"},
                           {"name": "kd", "model": "resnet10t", "role": "student", "teacher": "teacher"},
                           {"name": "fit", "model": "resnet10t", "role": "student", "teacher": "teacher",
                            "method": "fitnet"}])
    run_chain(cfg, tmp_path / "run", progress=False)
    assert probed == {"scratch": (False, 0), "kd": (True, 1), "fitnet": (False, 1)}


def test_the_trainer_tells_the_method_each_batch_of_the_epoch(tmp_path, monkeypatch):
    from src.distillation.methods import Method
    seen = []
    original = Method.begin_step

    def spy(self, batch, batches):
        seen.append((self.epoch, batch, batches))
        original(self, batch, batches)
    monkeypatch.setattr(Method, "begin_step", spy)
    cfg = tiny_cfg(train__epochs=2, stages=[{"name": "teacher", "model": "resnet10t", "role": "teacher"},
                                            {"name": "student", "model": "resnet10t", "role": "student",
                                             "teacher": "teacher", "method": "dkd", "method_args": {"warmup": 0.5}}])
    run_chain(cfg, tmp_path / "run", progress=False)
    n = seen[-1][2]
    assert n > 1 and seen[-n:] == [(2, b, n) for b in range(n)]  # the student's last epoch, batch by batch
    terms = pd.read_csv(tmp_path / "run" / "student" / "epoch_terms.csv")
    assert list(terms["alpha"]) == [1.0, 1.0]  # warm-up of half an epoch: full weight by each epoch's end
