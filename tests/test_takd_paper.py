"""The TAKD paper's models (registered with timm), its recipe, cached teacher logits, and the
reproduction's tables: verdicts on made-up numbers, Holm's correction, resume in the middle."""
import json
import math
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import yaml
import timm
import torch
from torch import nn

from conftest import ROOT, tiny_cfg

import src.models  # noqa: F401  (registers the paper's models)
from benchmarks import reproduce_takd as rt
from benchmarks.takd_tables import Comparison, paired_correct, summarise, verdict
from src.runs.runfolder import RunFolder
from src.models import count_params, create_model
from src.utils.stats import holm


# ------------------------------------------------------------------------------ models
def _conv(cin, cout, k, bias):
    return cin * cout * k * k + (cout if bias else 0)


def resnet_params(depth: int, classes: int = 10) -> int:
    """He et al.'s CIFAR ResNet counted from the architecture: stem, (depth - 2) / 6 BasicBlocks per
    stage at 16/32/64 channels, 1x1 conv + BN shortcuts where the shape changes, linear head."""
    n = (depth - 2) // 6
    total = _conv(3, 16, 3, False) + 2 * 16
    cin = 16
    for width in (16, 32, 64):
        for b in range(n):
            total += _conv(cin, width, 3, False) + 2 * width + _conv(width, width, 3, False) + 2 * width
            if cin != width:
                total += _conv(cin, width, 1, False) + 2 * width
            cin = width
    return total + 64 * classes + classes


def plain_params(spec: list, fcs: list, classes: int = 10, size: int = 32) -> int:
    total, cin = 0, 3
    for s in spec:
        if s == "M":
            size //= 2
        else:
            total += _conv(cin, s, 3, True) + 2 * s
            cin = s
    width = cin * size * size
    for h in [*fcs, classes]:
        total += width * h + h
        width = h
    return total


PLAIN = {2: ([16, "M", 16, "M"], []), 4: ([16, 16, "M", 32, 32, "M"], []),
         6: ([16, 16, "M", 32, 32, "M", 64, 64, "M"], []),
         8: ([16, 16, "M", 32, 32, "M", 64, 64, "M", 128, 128, "M"], [64]),
         10: ([32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"], [128])}
# the authors' CIFAR-100 table (plain_cnn_cifar.py, plane_cifar100_book): a 32-channel base
PLAIN_CIFAR100 = {2: ([32, "M", 32, "M"], []), 4: ([32, 32, "M", 64, 64, "M"], []),
                  6: ([32, 32, "M", 64, 64, "M", 128, 128], []),
                  8: ([32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M"], [64]),
                  10: ([32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"], [512])}


@pytest.mark.parametrize("depth", [8, 14, 20, 26, 32, 44, 56, 110])
def test_cifar_resnets_by_name_match_the_architecture(depth):
    model = timm.create_model(f"cifar_resnet{depth}", num_classes=10)
    assert count_params(model) == resnet_params(depth)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules()) == depth - 1
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_sizes_are_the_papers():
    assert count_params(timm.create_model("cifar_resnet20")) == pytest.approx(0.27e6, rel=0.02)
    assert count_params(timm.create_model("cifar_resnet110")) == pytest.approx(1.7e6, rel=0.03)


@pytest.mark.parametrize("layers", [2, 4, 6, 8, 10])
def test_plain_cnns_by_name_match_the_architecture(layers):
    model = create_model(f"plain_cnn{layers}", 10, image_size=32)
    spec, fcs = PLAIN[layers]
    assert count_params(model) == plain_params(spec, fcs)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == layers and all(c.bias is not None for c in convs)  # "plain CNN N": N conv layers
    assert len(linears) == 1 + len(fcs)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert create_model(f"plain_cnn{layers}", 100, image_size=32)(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("layers", [2, 4, 6, 8, 10])
def test_the_authors_cifar100_plain_cnns_are_wider(layers):
    model = timm.create_model(f"plain_cnn{layers}_cifar100", num_classes=100)
    spec, fcs = PLAIN_CIFAR100[layers]
    assert count_params(model) == plain_params(spec, fcs, classes=100)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    if layers == 2:
        assert count_params(model) == 215_172  # the authors' plain CNN 2 on CIFAR-100
    assert rt.model_for(f"plain_cnn{layers}", "cifar100") == f"plain_cnn{layers}_cifar100"
    assert rt.model_for(f"plain_cnn{layers}", "cifar10") == f"plain_cnn{layers}"


def test_a_saved_paper_model_loads_back_through_plain_timm(tmp_path):
    from safetensors.torch import save_file
    model = create_model("plain_cnn4", 10, image_size=32).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    again = timm.create_model("plain_cnn4", pretrained=True, num_classes=10, img_size=32,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "m.safetensors"))).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x), again(x))


# ------------------------------------------------------------------------------ recipe
def test_step_schedule_divides_the_lr_after_the_milestone_epochs():
    from src.spec.config import TrainConfig
    from src.distillation.recipe import lr_schedule
    spe = 3
    lrs = lr_schedule(0.1, TrainConfig(schedule="step", lr_milestones=[80, 120], lr_gamma=0.1, warmup_epochs=0),
                      150, spe)
    per_epoch = [lrs[e * spe:(e + 1) * spe] for e in range(150)]
    assert all(v == pytest.approx(0.1) for e in range(80) for v in per_epoch[e])          # epochs 1-80
    assert all(v == pytest.approx(0.01) for e in range(80, 120) for v in per_epoch[e])    # 81-120
    assert all(v == pytest.approx(0.001) for e in range(120, 150) for v in per_epoch[e])  # 121-150
    const = lr_schedule(0.01, TrainConfig(schedule="constant", warmup_epochs=0), 5, spe)
    assert const == [pytest.approx(0.01)] * 15


def test_the_scheduler_of_a_stage_applies_the_milestones(tmp_path):
    """The real LambdaLR of a stage, stepped as training steps it."""
    from src.distillation.recipe import lr_multiplier
    from src.distillation.recipe import make_optimizer
    cfg = tiny_cfg(train__optimizer="sgd", train__schedule="step", train__lr_milestones=[2, 3], train__epochs=4,
                   train__warmup_epochs=0.0)
    model = nn.Linear(4, 2)
    opt = make_optimizer(model, 0.1, 0.0, torch.device("cpu"), "sgd", 0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg.train, 5, 4))
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:10] == [pytest.approx(0.1)] * 10 and seen[10:15] == [pytest.approx(0.01)] * 5
    assert seen[15:] == [pytest.approx(0.001)] * 5


def _args(**over):
    args = rt.parse_args(["--out", "/tmp/unused", "--data-source", "digits"])
    for k, v in over.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize("family", ["plain", "resnet"])
def test_reproduction_configs_carry_the_authors_recipe(family, tmp_path):
    from src.spec.config import from_dict
    from src.distillation.recipe import stage_optimizer
    from src.distillation.stage import stage_lr
    args = _args()
    data = {"source": "digits", "root": "data"}
    cfg = from_dict(rt.students_config(family, "cifar10", list(rt.TABLES), 150, tmp_path, data, args))
    t = cfg.train
    assert (t.optimizer, t.momentum, t.batch_size, t.epochs, t.warmup_epochs, t.grad_clip) == ("sgd", 0.9, 128, 150, 0, 0)
    assert cfg.data.augment == "none" and t.label_smoothing == 0 and cfg.data.normalize == "cifar100"
    assert cfg.kd.alpha_start == cfg.kd.alpha_end == rt.KD_WEIGHT and cfg.kd.temperature == rt.TEMPERATURE
    students = [s for s in cfg.stages if s.name.startswith("student")]
    # scratch, KD, TAKD via each assistant, and DGKD from the teacher and every assistant (one dropped per batch)
    assert {s.seed_stream for s in students} == {"student"} and len(students) == 3 + len(rt.FAMILIES[family]["assistants"])
    dgkd = next(s for s in students if s.name == rt.DGKD_STAGE)
    assert dgkd.method == "dense" and dgkd.method_args == {"drop_teachers": 1}
    assert dgkd.teachers == ["teacher"] + [rt.ta_stage(a) for a in reversed(rt.FAMILIES[family]["assistants"])]
    model = create_model(students[0].model, 10, image_size=32)
    opt = stage_optimizer(model, stage_lr(cfg, students[0]), t, torch.device("cpu"))
    # train.py: optim.SGD(params, lr, momentum=0.9, weight_decay=1e-4): plain momentum, every parameter decayed
    assert all(not g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)
    decayed = [p for g in opt.param_groups if g["weight_decay"] == 1e-4 for p in g["params"]]
    assert len(decayed) == len(list(model.parameters()))
    assert stage_lr(cfg, students[0]) == 0.01  # no role factor; train.py's 0.01 for both families
    if family == "plain":
        assert t.schedule == "constant" and t.early_stop == 20
    else:  # train.py: 0.01 until 3/4 of the epochs, then 0.001
        assert t.schedule == "step" and t.lr_milestones == [112] and t.lr_gamma == 0.1 and t.early_stop == 0
    assert rt.milestones("resnet", 160) == [120] and rt.milestones("resnet", 30) == [22]


def test_the_authors_lr_schedule_as_it_runs():
    """train.py's adjust_learning_rate for ResNets, transcribed: its 0.1 branch is never taken."""
    def authors(epoch, epochs):
        if epoch < int(epoch / 2.0):
            return 0.1
        return 0.1 * 0.1 if epoch < int(epochs * 3 / 4.0) else 0.1 * 0.01
    from src.spec.config import from_dict
    from src.distillation.recipe import lr_multiplier
    cfg = from_dict(rt.students_config("resnet", "cifar10", ["table1"], 150, Path("/nonexistent"),
                                       {"source": "digits", "root": "data"}, _args()))
    f = lr_multiplier(cfg.train, steps_per_epoch=3, epochs=150)
    ours = [cfg.train.lr * f(3 * e) for e in range(150)]  # the first step of each (0-based) epoch
    assert ours == [pytest.approx(authors(e, 150)) for e in range(150)]


# ------------------------------------------------------------------------------ cached teacher logits
def _digits_loader(augment="none", erasing=0.0):
    from src.data import build_loaders, load_dataset
    cfg = tiny_cfg(data__augment=augment, data__random_erasing=erasing)
    data = load_dataset(cfg.data)
    return build_loaders(data, 32, torch.device("cpu"), cfg.data, False, seed=3)["train"]


def test_cached_teacher_logits_equal_the_online_ones():
    from src.distillation.engine import MAX_TEACHER_CACHE_BYTES, Precision
    from src.distillation.methods import KD

    def teacher_logits_table(teacher, loader, precision):
        method = KD([teacher])
        return method.cached[0] if method.cache_teacher_logits(loader, precision, MAX_TEACHER_CACHE_BYTES) else None
    torch.manual_seed(0)
    teacher = create_model("plain_cnn4", 10, image_size=16).eval()
    loader = _digits_loader()
    table = teacher_logits_table(teacher, loader, Precision("cpu", None))
    assert table is not None and table.shape == (len(loader.labels), 10)
    worst = 0.0
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        for x, _ in loader:
            with torch.no_grad():
                online = teacher(x)
            worst = max(worst, float((online - table[loader.batch_index]).abs().max()))
    assert worst <= 1e-5 * float(table.abs().max())  # same inputs, eval mode: float32 rounding at most
    assert teacher_logits_table(teacher, _digits_loader("crop_flip"), Precision("cpu", None)) is None
    assert teacher_logits_table(teacher, _digits_loader("none", 0.25), Precision("cpu", None)) is None


def test_an_epoch_with_cached_teacher_logits_trains_like_the_online_teacher():
    from src.distillation.engine import Precision, StepContext, train_one_epoch
    from src.distillation.recipe import make_optimizer
    torch.manual_seed(0)
    teacher = create_model("plain_cnn4", 10, image_size=16).eval()
    init = create_model("plain_cnn2", 10, image_size=16).state_dict()
    results = []
    for cached in (False, True):
        loader = _digits_loader()
        model = create_model("plain_cnn2", 10, image_size=16)
        model.load_state_dict(init)
        opt = make_optimizer(model, 0.01, 0.0, torch.device("cpu"), "sgd", 0.9)
        ctx = StepContext(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                          precision=Precision("cpu", None), teacher=teacher, num_classes=10)
        if cached:
            assert ctx.method.cache_teacher_logits(loader, ctx.precision, 1 << 30)
        loader.set_epoch(1)
        out = train_one_epoch(ctx, loader, alpha=0.5, progress=False)
        results.append((out["kd"], [p.detach().clone() for p in model.parameters()]))
    (kd_a, pa), (kd_b, pb) = results
    assert kd_a == pytest.approx(kd_b, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(pa, pb))


# ------------------------------------------------------------------------------ the table's logic
def test_verdicts_on_made_up_numbers():
    assert verdict(0.94, 0.3, 2.1) == "reproduced"                  # excludes 0 on the paper's side, holds +0.94
    assert verdict(0.94, 0.1, 0.3) == "smaller than published"      # the review's case: real, but not the paper's size
    assert verdict(0.94, 2.0, 5.0) == "larger than published"
    assert verdict(-0.5, -0.2, -0.1) == "smaller than published"    # a negative published gap, mirrored
    assert verdict(-0.5, -3.0, -1.0) == "larger than published"
    assert verdict(0.94, -2.1, -0.3) == "reversed"
    assert verdict(0.94, -0.4, 0.6) == "not reproduced"             # 0 inside, the paper's 0.94 outside
    assert verdict(0.94, -0.4, 1.5) == "within noise"               # both inside
    assert verdict(0.94, float("nan"), float("nan")) == "undecided"
    assert verdict(0.0, 0.1, 0.9) == verdict(0.0, -0.9, -0.1) == "differs from a published 0"  # neither "reversed"
    assert verdict(0.0, -0.1, 0.9) == "consistent with a published 0"
    assert verdict(None, 0.1, 0.9) == "significant" and verdict(None, -0.1, 0.9) == "not significant"
    from benchmarks.takd_tables import VERDICT_WORDS, VERDICTS
    assert set(VERDICT_WORDS) == set(VERDICTS)
    assert "paper" not in VERDICT_WORDS["significant"].replace("no published gap", "")


def test_each_assistant_row_has_its_own_published_number():
    from benchmarks.takd_tables import published
    assert [published("plain", "cifar10", "TAKD", a) for a in ("plain_cnn8", "plain_cnn6", "plain_cnn4")] == \
        [72.75, 73.15, 73.51]
    assert [published("plain", "cifar100", "TAKD", a) for a in ("plain_cnn8_cifar100", "plain_cnn6", "plain_cnn4")] == \
        [44.28, 44.57, 44.92]
    assert [published("resnet", "cifar10", "TAKD", f"cifar_resnet{d}") for d in (56, 32, 20, 14)] == \
        [88.70, 88.73, 88.90, 88.98]
    assert [published("resnet", "cifar100", "TAKD", f"cifar_resnet{d}") for d in (56, 32, 20, 14)] == \
        [61.47, 61.55, 61.82, 61.50]
    assert published("plain", "cifar10", "TAKD", "plain_cnn3") is None
    assert published("plain", "cifar10", "BLKD") == 72.57 and published("resnet", "cifar100", "NOKD") == 61.37
    # Table 1's TAKD number is Table 1's own (ResNet CIFAR-10: 88.98 there, 88.90 in the assistant-size table)
    assert published("resnet", "cifar10", "TAKD", "cifar_resnet20", table="table1") == 88.98
    assert published("resnet", "cifar10", "TAKD", "cifar_resnet20") == pytest.approx(88.90)
    assert published("plain", "cifar10", "TAKD", "plain_cnn4", table="table1") == 73.51


# Every published number, with the table and row it is read from (the paper's own tables).
PINNED = [
    ("Table 1", "CNN, CIFAR-10, NOKD", ("table1", "plain", "cifar10"), "NOKD", 70.16),
    ("Table 1", "CNN, CIFAR-10, BLKD", ("table1", "plain", "cifar10"), "BLKD", 72.57),
    ("Table 1", "CNN, CIFAR-10, TAKD", ("table1", "plain", "cifar10"), "TAKD", 73.51),
    ("Table 1", "CNN, CIFAR-100, NOKD", ("table1", "plain", "cifar100"), "NOKD", 41.09),
    ("Table 1", "CNN, CIFAR-100, BLKD", ("table1", "plain", "cifar100"), "BLKD", 44.57),
    ("Table 1", "CNN, CIFAR-100, TAKD", ("table1", "plain", "cifar100"), "TAKD", 44.92),
    ("Table 1", "ResNet, CIFAR-10, NOKD", ("table1", "resnet", "cifar10"), "NOKD", 88.52),
    ("Table 1", "ResNet, CIFAR-10, BLKD", ("table1", "resnet", "cifar10"), "BLKD", 88.65),
    ("Table 1", "ResNet, CIFAR-10, TAKD", ("table1", "resnet", "cifar10"), "TAKD", 88.98),
    ("Table 1", "ResNet, CIFAR-100, NOKD", ("table1", "resnet", "cifar100"), "NOKD", 61.37),
    ("Table 1", "ResNet, CIFAR-100, BLKD", ("table1", "resnet", "cifar100"), "BLKD", 61.41),
    ("Table 1", "ResNet, CIFAR-100, TAKD", ("table1", "resnet", "cifar100"), "TAKD", 61.82),
    ("Table 2", "CIFAR-10, TA 8", ("plain", "cifar10"), "plain_cnn8", 72.75),
    ("Table 2", "CIFAR-10, TA 6", ("plain", "cifar10"), "plain_cnn6", 73.15),
    ("Table 2", "CIFAR-10, TA 4", ("plain", "cifar10"), "plain_cnn4", 73.51),
    ("Table 2", "CIFAR-100, TA 8", ("plain", "cifar100"), "plain_cnn8", 44.28),
    ("Table 2", "CIFAR-100, TA 6", ("plain", "cifar100"), "plain_cnn6", 44.57),
    ("Table 2", "CIFAR-100, TA 4", ("plain", "cifar100"), "plain_cnn4", 44.92),
    ("Table 3", "CIFAR-10, TA 56", ("resnet", "cifar10"), "cifar_resnet56", 88.70),
    ("Table 3", "CIFAR-10, TA 32", ("resnet", "cifar10"), "cifar_resnet32", 88.73),
    ("Table 3", "CIFAR-10, TA 20", ("resnet", "cifar10"), "cifar_resnet20", 88.90),
    ("Table 3", "CIFAR-10, TA 14", ("resnet", "cifar10"), "cifar_resnet14", 88.98),
    ("Table 3", "CIFAR-100, TA 56", ("resnet", "cifar100"), "cifar_resnet56", 61.47),
    ("Table 3", "CIFAR-100, TA 32", ("resnet", "cifar100"), "cifar_resnet32", 61.55),
    ("Table 3", "CIFAR-100, TA 20", ("resnet", "cifar100"), "cifar_resnet20", 61.82),
    ("Table 3", "CIFAR-100, TA 14", ("resnet", "cifar100"), "cifar_resnet14", 61.50),
]


@pytest.mark.parametrize("table, row, key, entry, value", PINNED, ids=[f"{t}: {r}" for t, r, *_ in PINNED])
def test_every_published_number_is_pinned_to_its_table_and_row(table, row, key, entry, value):
    from benchmarks.takd_tables import PUBLISHED, PUBLISHED_ASSISTANTS
    source = PUBLISHED if table == "Table 1" else PUBLISHED_ASSISTANTS
    assert source[key][entry] == value


def test_no_published_number_is_left_unpinned():
    from benchmarks.takd_tables import PUBLISHED, PUBLISHED_ASSISTANTS
    numbers = sum(len(v) for v in PUBLISHED.values()) + sum(len(v) for v in PUBLISHED_ASSISTANTS.values())
    assert numbers == len(PINNED)


def test_a_corrected_interval_that_holds_the_gap_is_not_reproduced_when_uncorrected_would_be():
    """Three comparisons read together: each interval at 1 - 0.05 / 3. One whose 95% interval
    excludes 0 but whose corrected interval holds it reads "within noise", not "reproduced"."""
    from scipy import stats
    diffs = [0.6, 0.9, 1.2]
    mean, sd = np.mean(diffs), np.std(diffs, ddof=1)
    half95 = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    half_corr = stats.t.ppf(1 - 0.05 / 6, 2) * sd / math.sqrt(3)
    assert mean - half95 > 0 > mean - half_corr  # the made-up case: significant only uncorrected
    alone = summarise([Comparison("TAKD - BLKD", diffs, [0.01] * 3, 0.94)])[0]
    assert alone["verdict"] == "reproduced" and alone["level"] == pytest.approx(0.95)
    three = summarise([Comparison("TAKD - BLKD", diffs, [0.01] * 3, 0.94),
                       Comparison("a", [0.1, 0.2, 0.3], [0.5] * 3, None), Comparison("b", [1, 2, 3], [0.5] * 3, None)])
    assert three[0]["verdict"] == "within noise" and three[0]["level"] == pytest.approx(1 - 0.05 / 3)
    assert (three[0]["lo"], three[0]["hi"]) == pytest.approx((mean - half_corr, mean + half_corr))


def test_the_same_difference_on_every_seed_is_undecided_not_significant():
    """Identical per-seed differences give a zero-width t interval that "excludes 0" on no
    evidence of the noise: it reads undecided, yet still counts in the Bonferroni level."""
    out = summarise([Comparison("TAKD - BLKD", [0.5, 0.5, 0.5], [0.6] * 3, 0.94),
                     Comparison("b", [1, 2, 3], [0.5] * 3, None)])
    assert out[0]["verdict"] == "undecided" and out[0]["mean"] == pytest.approx(0.5)
    assert math.isnan(out[0]["lo"]) and math.isnan(out[0]["hi"])
    assert out[1]["level"] == pytest.approx(1 - 0.05 / 2)
    assert summarise([Comparison("a", [0.5, 0.5, 0.5], [0.6] * 3, None)])[0]["verdict"] == "undecided"


def test_a_run_of_another_length_gets_no_verdict_against_the_paper():
    from benchmarks.takd_tables import not_comparable
    reason = not_comparable(15, 15, 150)
    assert reason == "not comparable: 15 of 150 epochs"
    assert not_comparable(15, 8, 150) == "not comparable: 8 teacher and 15 student epochs of 150"
    assert not_comparable(150, 150, 150) is None
    out = summarise([Comparison("TAKD - BLKD", [1.0, 1.4, 1.2], [0.001] * 3, 0.94)], reason)[0]
    assert out["verdict"] == f"significant ({reason})" and "reproduced" not in out["verdict"]
    assert reason in out["words"]


def test_a_preset_as_declared_is_no_override_of_its_own_protocol(tmp_path):
    """--slice cpu declares early stopping off: run as declared, only its length makes it not comparable.
    (--data-root: any folder that exists; the checkout need not sit beside the shared data.)"""
    where = ["--out", "/nonexistent/never-written", "--data-root", str(tmp_path)]
    reason = rt.comparability(rt.parse_args(["--slice", "cpu", *where]))
    assert reason == "not comparable: 8 teacher and 15 student epochs of 150"
    args = rt.parse_args(["--slice", "cpu", "--early-stop", "5", *where])
    assert "early stopping for plain after 5 epochs" in rt.comparability(args)


def test_any_override_of_the_declared_protocol_makes_a_run_not_comparable(tmp_path):
    """The full-length slice with a data cap, a changed patience or other seeds gets no verdict
    against the paper, and each override is listed among the deviations."""
    base = ["--slice", "cpu-full", "--out", "/nonexistent/never-written", "--data-root", str(tmp_path)]
    assert rt.comparability(rt.parse_args(base)) is None  # as declared: comparable
    for extra, words in ((["--set", "data.max_train_samples=500"], "--set data.max_train_samples=500"),
                         (["--early-stop", "1"], "early stopping for plain after 1 epochs"),
                         (["--seeds", "0,1"], "seeds 0,1 (declared: 0,1,2)"),
                         (["--set", "train.lr=0.1"], "--set train.lr=0.1")):
        args = rt.parse_args(base + extra)
        reason = rt.comparability(args)
        assert reason and reason.startswith("not comparable: overrides the declared protocol") and words in reason
        assert any(words in d for d in rt.deviations(args, args.families))


def test_holm_adjusts_as_the_step_down_method():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 0.8 x 2 capped at 1; monotone


def test_summaries_correct_across_every_comparison_of_the_report():
    a = Comparison("TAKD - BLKD", [1.0, 1.4, 1.2], [0.001, 0.002, 0.003], 0.94)
    b = Comparison("BLKD - NOKD", [-0.2, 0.3, 0.1], [0.5, 0.6, 0.7], 2.41)
    sa, sb = summarise([a, b])
    assert sa["p_holm"] == pytest.approx(holm([0.001, 0.002, 0.003, 0.5, 0.6, 0.7])[:3])
    assert sa["p_holm"] == pytest.approx([0.006, 0.01, 0.012])
    assert sa["significant_seeds"] == 3 and sa["verdict"] == "reproduced"
    assert sb["verdict"] == "not reproduced" and sb["significant_seeds"] == 0
    # two comparisons: each interval at 97.5% (t quantile 0.9875, 2 degrees of freedom: 6.205346816)
    mean, half = np.mean(a.diffs), 6.205346816 * np.std(a.diffs, ddof=1) / math.sqrt(3)
    assert (sa["mean"], sa["lo"], sa["hi"]) == pytest.approx((mean, mean - half, mean + half))


def test_paired_predictions_join_on_the_file_and_refuse_other_labels():
    a = pd.DataFrame({"file": ["x", "y", "z"], "y_true": [0, 1, 2], "y_pred": [0, 1, 0]})
    b = pd.DataFrame({"file": ["z", "x", "y"], "y_true": [2, 0, 1], "y_pred": [2, 1, 1]})
    ca, cb = paired_correct(a, b)
    assert ca.tolist() == [True, True, False] and cb.tolist() == [False, True, True]
    with pytest.raises(ValueError, match="different labels"):
        paired_correct(a, b.assign(y_true=[2, 0, 0]))
    with pytest.raises(ValueError, match="different images"):
        paired_correct(a, b.assign(file=["z", "x", "w"]))


# ------------------------------------------------------------------------------ one command, resumable
def _reproduce_args(out, results, *extra):
    return ["--tables", "table1", "--families", "plain", "--datasets", "cifar10", "--data-source", "digits",
            "--epochs", "2", "--seeds", "0,1", "--out", str(out), "--results", str(results),
            "--set", "data.max_train_samples=200", "--set", "data.max_test_samples=100", "--set", "data.image_size=16",
            *extra]


def _reproduce(out, results, *extra, **kw):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reproduce_takd.py"), *_reproduce_args(out, results, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def test_the_reproduction_resumes_after_a_stop_in_its_middle(tmp_path, capsys):
    from benchmarks import reproduce_takd
    out, results = tmp_path / "out", tmp_path / "res" / "takd.csv"
    proc = _reproduce(out, results)
    marker = out / "plain-cifar10" / "students" / "seed_0" / "student_scratch" / "epoch_log.csv"
    deadline = time.time() + 900
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole process group, as a terminal sends it
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 130, text[-3000:]
    assert "--resume" in text and not results.exists()
    resumes = [ln for ln in text.splitlines() if "--resume" in ln and "reproduce_takd.py" in ln]
    assert len(resumes) == 1 and "train_cnn.sh" not in text  # one command, the reproduction's own
    assert "Whole reproduction: about" in text and "teacher and assistants" in text.split("Whole reproduction")[1]
    capsys.readouterr()  # the refusals, in this process (main() is the script's whole body)
    assert reproduce_takd.main(_reproduce_args(out, results)) == 2  # without --resume: nothing is overwritten
    assert "add --resume" in capsys.readouterr().err
    assert reproduce_takd.main(_reproduce_args(out, results, "--resume", "--teacher-epochs", "3")) == 2
    assert "other settings" in capsys.readouterr().err
    code = reproduce_takd.main(_reproduce_args(out, results, "--resume"))  # its training runs are processes of their own
    text = capsys.readouterr().out
    assert code == 0, text[-3000:]
    assert "teacher and assistants: finished earlier" in text
    assert "Whole reproduction: about" in text and "students, seeds 0,1" in text.split("Whole reproduction")[1]
    table = pd.read_csv(results)
    assert list(table["row"]) == ["NOKD", "BLKD", "TAKD"] and (table["seeds"] == 2).all()
    assert list(table["published"]) == [70.16, 72.57, 73.51]
    assert table["comparable"].str.startswith("not comparable: 2 of 150 epochs; overrides the declared protocol: "
                                              "--set data.max_train_samples=200").all()
    assert table["comparable"].str.contains("seeds 0,1 \\(declared: 0,1,2\\)").all()
    tests = pd.read_csv(results.with_name("takd_tests.csv"))
    assert list(tests["comparison"]) == ["TAKD - BLKD", "BLKD - NOKD"]
    assert all("(not comparable: 2 of 150 epochs;" in v and "reproduced" not in v for v in tests["verdict"])
    for seed in (0, 1):
        for stage in ("student_scratch", "student_kd", "student"):
            log = pd.read_csv(out / "plain-cifar10" / "students" / f"seed_{seed}" / stage / "epoch_log.csv")
            assert list(log["epoch"]) == [1, 2]
    md = results.with_suffix(".md").read_text()
    assert "Differences from the authors' code" in md and "Holm" in md and "| TAKD - BLKD |" in md
    assert "| not comparable: 2 of 150 epochs; overrides the declared protocol" in md
    assert "override of the declared protocol: --set data.max_train_samples=200" in md
    assert "The correction's family: the 2 comparisons of this table" in md and "With two seeds" in md


# ------------------------------------------------------------------------------ CPU speed settings
def test_compile_auto_on_a_cpu_skips_stages_too_short_to_repay_a_probe(monkeypatch):
    from src.distillation import chain, planner
    from src.distillation.chain import plan_stage
    monkeypatch.setattr(chain, "_PLAN_CACHE", {})  # plans are reused per model and shape within a process
    probed = []
    monkeypatch.setattr(planner, "measure_steps", lambda *a, **k: probed.append(1) or {"img_per_s": 1.0,
                                                                                      "peak_reserved_gib": 0.0})
    cfg = tiny_cfg()
    plan = plan_stage(cfg, cfg.stages[1], torch.device("cpu"), 10, train_images=100)
    assert plan.compile is False and not probed and any("not probed" in n for n in plan.notes)
    forced = plan_stage(replace(cfg, train=replace(cfg.train, compile="true")), cfg.stages[1], torch.device("cpu"), 10,
                        train_images=100)
    assert forced.compile is True and not probed
    # a long stage is measured: eager speed first, then (here, at 1 img/s) the compiled one
    monkeypatch.setattr(planner, "_probe_compile", lambda p, *a, **k: replace(p, compile=True, notes=p.notes + ["c"]))
    chain._PLAN_CACHE.clear()
    long = plan_stage(replace(cfg, train=replace(cfg.train, epochs=10_000)), cfg.stages[1], torch.device("cpu"), 10,
                      train_images=10_000)
    assert probed and long.compile is True and long.probe_img_per_s == 1.0


def test_channels_last_is_the_cpu_default_for_cnns_only():
    from src.distillation.stage import use_channels_last
    cfg = tiny_cfg()
    assert use_channels_last(cfg, cfg.stages[0], torch.device("cpu"))
    vit = replace(cfg.stages[0], model="vit_tiny_patch16_224")
    assert not use_channels_last(cfg, vit, torch.device("cpu"))


def test_cpu_threads_follow_the_affinity_and_yield_to_omp(monkeypatch):
    from src.utils.devices import set_cpu_threads
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
        assert set_cpu_threads(torch.device("cpu"), 2) == 2 and torch.get_num_threads() == 2
        assert set_cpu_threads(torch.device("cpu"), 1) == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_cpu_threads(torch.device("cpu")) is None
    finally:
        torch.set_num_threads(before)


def test_students_of_several_seeds_at_once_give_the_numbers_of_one_at_a_time(tmp_path, capsys, monkeypatch):
    """--jobs 2: the students' stage jobs (of any seed) two at once, each in its own process and
    console log (SEED_RUN/logs/<stage>.log); the per-seed results equal --jobs 1's. Both at one
    thread per job: on a CPU the thread count can change the order of float sums, which no
    scheduling should hide."""
    from benchmarks import reproduce_takd
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    res = {}
    for jobs in (1, 2):
        out, results = tmp_path / f"jobs{jobs}", tmp_path / f"jobs{jobs}.csv"
        args = _reproduce_args(out, results, "--jobs", str(jobs))
        args[args.index("--epochs") + 1] = "1"
        assert reproduce_takd.main(args) == 0, capsys.readouterr()
        res[jobs] = pd.read_csv(results)
        students = out / "plain-cifar10" / "students"
        assert json.loads((students / "seeds.json").read_text())["seeds"] == [0, 1]
        for seed in (0, 1):
            assert (students / f"seed_{seed}" / "summary.csv").exists()
        logs = sorted(p.name for p in (students / "seed_1" / "logs").glob("*.log"))
        assert logs == (["student.log", "student_kd.log", "student_scratch.log", "ta_plain_cnn4.log", "teacher.log"]
                        if jobs == 2 else [])
        assert json.loads((students / "jobs.json").read_text())["threads"] == 1
    assert "executor: local" in capsys.readouterr().out
    pd.testing.assert_frame_equal(res[1], res[2])
    for seed in (0, 1):
        for stage in ("student_scratch", "student_kd", "student"):
            a, b = (pd.read_csv(tmp_path / f"jobs{j}" / "plain-cifar10" / "students" / f"seed_{seed}" / stage /
                                "test_predictions.csv") for j in (1, 2))
            pd.testing.assert_frame_equal(a, b)


def test_students_keep_the_thread_count_they_started_with(tmp_path, monkeypatch):
    """Seeds 0-2 with --jobs 2 on two cores: one thread per student job. Resumed (with any --jobs),
    the recorded count (jobs.json; seeds.json in runs begun by an earlier version) is kept: paired
    students must not differ in the order of their float sums. It reaches the run as --threads."""
    from types import SimpleNamespace
    from benchmarks import reproduce_takd as rt
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    fresh = RunFolder(tmp_path / "fresh")
    assert rt.student_threads(fresh, [0, 1, 2], 2) == 1 and rt.student_threads(fresh, [0, 1, 2], 1) == 2
    old = RunFolder(tmp_path / "old")
    old.path.mkdir()
    old.seeds_file.write_text(json.dumps({"seeds": [0, 1, 2], "threads": 1}))
    assert rt.student_threads(old, [0, 1, 2], 1) == 1
    new = RunFolder(tmp_path / "new")
    new.path.mkdir()
    new.file(RunFolder.JOBS).write_text(json.dumps({"threads": 1, "jobs": []}))
    assert rt.student_threads(new, [2], 1) == 1
    seen = []
    monkeypatch.setattr(rt.cli, "run", lambda argv, *a, **k: seen.append((argv, k)) or 0)
    args = SimpleNamespace(jobs=2, executor=None, ray_address=None, verbose=False, argv=["--slice", "cpu"])
    assert rt.train_run(tmp_path / "c.yaml", tmp_path / "students", args, [0, 1, 2], threads=1) == 0
    argv, kw = seen[-1]
    assert argv[argv.index("--threads") + 1] == "1" and argv[argv.index("--jobs") + 1] == "2"
    assert argv[argv.index("--seeds") + 1] == "0,1,2"
    assert kw["resume_command"] == "python benchmarks/reproduce_takd.py --slice cpu --resume"


def test_the_reproduction_has_no_scheduler_of_its_own():
    """Its runs go through the toolkit's command line and executors: no process pool, no polling."""
    text = (ROOT / "benchmarks" / "reproduce_takd.py").read_text()
    assert "Popen" not in text and ".poll(" not in text and "subprocess" not in text


def test_the_run_clock_survives_a_kill_of_the_reproduction(tmp_path):
    """The reproduction's process killed outright (SIGKILL, as when a session ends) while a run
    trains: its wall time so far is in timings.json all the same, and a resume adds to it."""
    path = tmp_path / "timings.json"
    code = ("import time; from pathlib import Path; from benchmarks import reproduce_takd as rt\n"
            f"with rt.RunClock(Path({str(path)!r}), 'teachers', every=0.2):\n    time.sleep(60)")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True)
    while not path.exists() and proc.poll() is None and time.perf_counter() - t0 < 180:
        time.sleep(0.1)  # the imports take a while
    while json.loads(path.read_text() or "{}").get("teachers", 0) < 1.0 and time.perf_counter() - t0 < 180:
        time.sleep(0.1)  # a second of the clock written (a loaded machine writes late, not never)
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: only what was written survives
    proc.wait()
    first = json.loads(path.read_text())["teachers"]
    assert 1.0 <= first <= time.perf_counter() - t0
    from benchmarks import reproduce_takd as rt
    with rt.RunClock(path, "teachers", every=60.0):  # the resumed session
        time.sleep(0.5)
    assert json.loads(path.read_text())["teachers"] >= first + 0.5


def test_the_stages_own_time_counts_every_session(tmp_path):
    """Summed from the stages' summaries (written with every epoch), not from the run clock."""
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    pd.DataFrame({"stage": ["teacher", "ta"], "train_seconds": [100.0, 20.0], "eval_seconds": [5.0, float("nan")],
                  "compile_seconds": [0.0, 1.0]}).to_csv(a, index=False)
    pd.DataFrame({"stage": ["student"], "train_seconds": [7.5], "eval_seconds": [0.5]}).to_csv(b, index=False)
    assert rt.stage_seconds([a, b, tmp_path / "missing.csv"]) == pytest.approx(134.0)
    assert rt.stage_seconds([]) == 0.0


def test_more_assistants_beside_a_finished_runs_teacher_train_only_the_new_ones(tmp_path, capsys):
    """--tables assistants --teachers-from A: the teacher and plain_cnn4 that A finished are loaded,
    not trained; plain_cnn6 and plain_cnn8 train; the students equal A's where A has them. Other
    settings than A's are refused before anything is written."""
    from benchmarks import reproduce_takd
    first, sizes = tmp_path / "first", tmp_path / "sizes"
    one_seed = lambda out, *extra: [a if a != "0,1" else "0" for a in _reproduce_args(out, out / "t.csv", *extra)]  # noqa: E731
    assert reproduce_takd.main(one_seed(first)) == 0, capsys.readouterr().out[-3000:]
    capsys.readouterr()
    refused = one_seed(tmp_path / "other", "--tables", "assistants", "--teachers-from", str(first), "--early-stop", "3")
    assert reproduce_takd.main(refused) == 2
    err = capsys.readouterr().err
    assert "other settings (train.early_stop)" in err and not (tmp_path / "other").exists(), err
    args = one_seed(sizes, "--teachers-from", str(first))
    args[args.index("--tables") + 1] = "assistants"
    assert reproduce_takd.main(args) == 0, capsys.readouterr().out[-3000:]
    a, b = (out / "plain-cifar10" / "teachers" for out in (first, sizes))
    for stage in ("teacher", "ta_plain_cnn4"):
        assert pd.read_csv(b / stage / "epoch_log.csv").empty  # loaded, not trained
        assert (a / stage / "test_predictions.csv").read_text() == (b / stage / "test_predictions.csv").read_text()
    for stage in ("ta_plain_cnn6", "ta_plain_cnn8"):
        assert len(pd.read_csv(b / stage / "epoch_log.csv")) == 2
    for stage in ("student_scratch", "student_kd", "student"):
        pa, pb = (out / "plain-cifar10" / "students" / "seed_0" / stage / "test_predictions.csv" for out in (first, sizes))
        assert pa.read_text() == pb.read_text()
    table = pd.read_csv(sizes / "t.csv")
    assert list(table["row"]) == ["NOKD", "BLKD", "TAKD", "TAKD, assistant plain_cnn6", "TAKD, assistant plain_cnn8",
                                  reproduce_takd.DGKD_ROW]
    dgkd = table.set_index("stage").loc[reproduce_takd.DGKD_STAGE]
    assert pd.isna(dgkd["published"]) and dgkd["source"].startswith("not in the paper") and dgkd["seeds"] == 1
    stage = json.loads((sizes / "plain-cifar10" / "students" / "seed_0" / "student_dgkd" / "stage.json").read_text())
    assert "dense from teacher + ta_plain_cnn8 + ta_plain_cnn6 + ta_plain_cnn4, 1 dropped per batch" in json.dumps(stage)
    tests = pd.read_csv(sizes / "t_tests.csv").set_index("comparison")
    assert pd.isna(tests.loc["DGKD - TAKD", "paper_gap"]) and len(tests) == 5  # 3 TAKD - BLKD, BLKD - NOKD, DGKD - TAKD
    md = (sizes / "t.md").read_text()
    assert f"trained in {a} and loaded here" in md and "| DGKD - TAKD |" in md


def test_reproduction_arguments_are_checked_before_anything_is_written(tmp_path, capsys):
    from benchmarks import reproduce_takd
    out = tmp_path / "out"
    for bad, words in ((["--data-root", str(tmp_path / "missing.tar.gz")], "does not exist"),
                       (["--jobs", "0"], "--jobs must be at least 1"), (["--seeds", "0,x"], "whole numbers"),
                       (["--early-stop", "-3"], "--early-stop"), (["--families", "vgg"], "unknown family vgg")):
        code = reproduce_takd.main(["--datasets", "cifar10", "--families", "plain", "--out", str(out), *bad])
        err = capsys.readouterr().err
        assert code == 2 and words in err and "--resume" not in err and err.count("\n") == 1, err
        assert not out.exists()


def test_methods_beside_kd_from_the_teacher_and_via_the_assistant(tmp_path, capsys):
    """--methods dkd,at: per seed, each method's student from the teacher and via the assistant, the
    same seed stream as KD's; a table of their own (no verdicts against the paper) with via - direct
    and method - KD per method, Bonferroni over those comparisons."""
    from benchmarks import reproduce_takd
    out, results = tmp_path / "out", tmp_path / "res" / "takd.csv"
    args = _reproduce_args(out, results, "--methods", "dkd,at")
    args[args.index("--epochs") + 1] = "1"
    assert reproduce_takd.main(args) == 0, capsys.readouterr().out[-3000:]
    methods = pd.read_csv(results.with_name("takd_methods.csv"))
    assert list(zip(methods["method"], methods["via"])) == [
        ("kd", "teacher"), ("kd", "plain_cnn4"), ("dkd", "teacher"), ("dkd", "plain_cnn4"), ("at", "teacher"),
        ("at", "plain_cnn4")]
    assert list(methods["stage"]) == ["student_kd", "student", "student_dkd", "student_dkd_via_ta_plain_cnn4",
                                      "student_at", "student_at_via_ta_plain_cnn4"]
    assert (methods["seeds"] == 2).all()
    tests = pd.read_csv(results.with_name("takd_methods_tests.csv"))
    assert list(tests["comparison"]) == ["KD via plain_cnn4 - KD direct", "DKD via plain_cnn4 - DKD direct",
                                         "DKD direct - KD direct", "AT via plain_cnn4 - AT direct", "AT direct - KD direct"]
    assert {v.split(":")[0] if v.startswith("not interpretable") else v for v in tests["verdict"]} <= {
        "significant", "not significant", "undecided", "not interpretable"}  # 1-epoch digits students: some near chance
    assert tests["level"].round(4).eq(round(1 - 0.05 / 5, 4)).all()  # corrected over the methods' own comparisons
    seed0 = out / "plain-cifar10" / "students" / "seed_0"
    info = json.loads((seed0 / "student_dkd" / "stage.json").read_text())
    assert info["method"] == "dkd" and "warm-up 0.0833 epochs" in info["method_label"]  # 20 of 240 x 1 epoch, unrounded
    summary = pd.read_csv(seed0 / "summary.csv")
    assert set(summary[summary["role"] == "student"]["seed_stream"]) == {"student"}
    md = results.with_suffix(".md").read_text()
    assert "## Methods beside KD (not in the paper)" in md and "| DKD via plain_cnn4 - DKD direct |" in md
    assert (out / "plain-cifar10" / "students" / "figures" / "methods_direct_and_via.png").exists()  # over the seeds
    # the TAKD table is untouched by the extra students
    assert list(pd.read_csv(results)["row"]) == ["NOKD", "BLKD", "TAKD"]


def test_the_reproduction_tunes_blkd_and_takd_on_validation_with_the_same_trials(tmp_path, capsys):
    """--tune N: BLKD's and TAKD's students each searched with N trials on validation (the teacher and
    the assistant trained once), then every seed trains both tuned students beside the declared ones;
    the table says how they were tuned where the paper says "best of 120 on test", and compares
    TAKD and BLKD both tuned. The estimate counts the search."""
    from benchmarks import reproduce_takd
    out, results = tmp_path / "out", tmp_path / "res" / "takd.csv"
    args = _reproduce_args(out, results, "--tune", "2")
    args[args.index("--epochs") + 1] = "1"
    code = reproduce_takd.main(args)
    text = capsys.readouterr().out
    assert code == 0, text[-3000:]
    assert "the --tune search as if no trial were pruned" in text.split("Whole reproduction")[1].splitlines()[0]
    students = out / "plain-cifar10" / "students"
    for stage in ("student_kd", "student"):
        assert len(list((students / "tune" / stage).glob("trial_*"))) == 2
    table = pd.read_csv(results)
    assert list(table["row"]) == ["NOKD", "BLKD", "TAKD", "BLKD, tuned (tuned on validation with 2 trials each; the paper: "
                                  "best of 120 on test)", "TAKD, tuned (tuned on validation with 2 trials each; the "
                                  "paper: best of 120 on test)"]
    assert (table["seeds"] == 2).all()
    assert "TAKD - BLKD (both tuned)" in list(pd.read_csv(results.with_name("takd_tests.csv"))["comparison"])
    for seed in (0, 1):
        done = json.loads((students / f"seed_{seed}" / "student_tuned" / "stage.json").read_text())
        assert done["test_accuracy"] == done["test_accuracy"]  # the final students read the test split once


def test_a_method_that_cannot_work_on_the_reproductions_models_is_refused_before_anything_trains(tmp_path, capsys):
    from benchmarks import reproduce_takd
    out = tmp_path / "out"
    for methods, words in (("dkd,dsit", "unknown dsit"), ("deit", "distillation token")):
        code = reproduce_takd.main(_reproduce_args(out, tmp_path / "r.csv", "--methods", methods))
        err = capsys.readouterr().err
        assert code == 2 and words in err and err.count("\n") == 1, err
        assert not out.exists()


def test_a_collapsed_student_makes_its_comparisons_not_interpretable(tmp_path):
    """A student that predicts one class (or scores near chance) in a seed: its row names it and
    every comparison it is in reads "not interpretable", whatever the test says."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200)
    seeds = []
    for seed in (0, 1):
        d = tmp_path / f"seed_{seed}"
        for stage, pred in (("student_kd", np.where(rng.random(200) < 0.7, y, (y + 1) % 10)),
                            ("student_dkd", np.full(200, 3) if seed == 0 else y),
                            ("student_dist", (y + 1 + (rng.random(200) < 0.1)) % 10)):  # about 5%: below chance's bar
            (d / stage).mkdir(parents=True)
            pd.DataFrame({"file": [f"{i}.png" for i in range(200)], "y_true": y, "y_pred": pred}).to_csv(
                d / stage / "test_predictions.csv", index=False)
        seeds.append((seed, d))
    assert rt.broken(seeds, "student_kd") == []
    assert rt.broken(seeds, "student_dkd") == [
        "seed 0: student_dkd predicts one class for 100% of the test images"]
    assert [t.split(" at ")[0] for t in rt.broken(seeds, "student_dist")] == [
        "seed 0: student_dist", "seed 1: student_dist"]
    tests = pd.DataFrame({"verdict": ["significant", "not significant"], "words": ["w1", "w2"]})
    out = rt.unreadable(tests, [rt.broken(seeds, "student_dkd"), []])
    assert out.loc[0, "verdict"].startswith("not interpretable: seed 0: student_dkd predicts one class")
    assert out.loc[0, "verdict"].endswith("(the tests alone: significant)") and out.loc[1, "verdict"] == "not significant"


def test_the_methods_table_says_the_dkd_warm_up_the_runs_recorded(tmp_path):
    from types import SimpleNamespace
    args = SimpleNamespace(out=tmp_path, epochs=15)
    assert rt._dkd_warmup_words(args) == "DKD's warm-up kept at its paper's share of training: 1.25 of 15 epochs"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "plain-cifar10-students.yaml").write_text(yaml.safe_dump({"stages": [
        {"name": "student_kd", "teacher": "teacher"},
        {"name": "student_dkd", "teacher": "teacher", "method": "dkd", "method_args": {"warmup": 1}}]}))
    assert rt._dkd_warmup_words(args) == ("DKD's warm-up as these runs recorded it: 1 of 15 epochs, where the "
                                          "paper's share is 1.25")


def test_a_verdict_over_seeds_is_named_so_beside_the_per_seed_tests():
    """'not significant' beside '3/3 seeds significant after Holm' reads as a contradiction: the
    verdict is over seeds, the count per seed, and the tables say what each test asks."""
    from types import SimpleNamespace
    row = SimpleNamespace(verdict="not significant", significant_seeds=3, seeds=3)
    assert rt._reading(row) == "**not significant over seeds** (3/3 seeds significant after Holm, per seed)"
    row = SimpleNamespace(verdict="significant (not comparable: 15 of 150 epochs)", significant_seeds=1, seeds=3)
    assert rt._reading(row).startswith("**significant over seeds (not comparable")
    assert rt._reading(SimpleNamespace(verdict="within noise", significant_seeds=0, seeds=3)).startswith("**within noise**")
    assert "over seeds" in rt.TWO_TESTS and "McNemar" in rt.TWO_TESTS


def test_a_student_still_rising_is_not_interpretable_in_the_reproduction_as_in_the_report(tmp_path):
    """The same students, read by the reproduction's tables and by the report, get one reading:
    a student whose validation accuracy was still rising at its last epoch is named by both."""
    from src.analysis.report import still_rising
    from src.utils.logger import EpochLogger, REQUIRED_COLUMNS
    run = RunFolder(tmp_path / "seed_0")
    stage = run.stage("student_kd")
    stage.path.mkdir(parents=True)
    log = EpochLogger(stage.epoch_log)
    for e, v in enumerate([0.30, 0.40, 0.45], 1):
        log.log({c: (e if c == "epoch" else v if c == "val_accuracy" else 0.0) for c in REQUIRED_COLUMNS})
    pd.DataFrame({"file": range(20), "y_true": [i % 10 for i in range(20)],
                  "y_pred": [i % 10 for i in range(20)]}).to_csv(stage.predictions, index=False)
    assert still_rising(stage)
    reasons = rt.broken([(0, run.path)], "student_kd")
    assert reasons == [f"seed 0: student_kd: validation accuracy still rising at its last epoch ({still_rising(stage)})"]
