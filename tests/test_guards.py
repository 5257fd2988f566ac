"""Each guard tested by what it guarantees."""
import gc
import logging
import weakref

import pytest
import torch
from torch import nn

from src.distillation.engine import Precision, StepContext, train_one_epoch
from src.utils.errors import NonFiniteLossError
from src.utils.training_guards import (LR_FACTORS, cleanup_training_state, count_block_recomputation,
                                       enforce_gradient_checkpointing, freeze_teacher, get_model_specific_lr,
                                       gradient_checkpointing_active, peak_memory_mb, reset_peak_memory_stats,
                                       schedule_kd_alpha, validate_loss)
from tests.conftest import requires_cuda


def _loader(n=64, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 3, 16, 16, generator=g)
    ys = torch.randint(0, 4, (n,), generator=g)

    class L(list):
        def set_epoch(self, e):
            pass
    return L([(xs[i:i + bs], ys[i:i + bs]) for i in range(0, n, bs)])


def _cnn(classes=4):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def test_frozen_teacher_gets_no_gradient_and_stays_in_eval_through_student_training():
    torch.manual_seed(0)
    teacher, student = freeze_teacher(_cnn(), verbose=False), _cnn()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()  # an accidental train() must not unfreeze batch-norm / dropout
    assert not any(m.training for m in teacher.modules())
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ctx = StepContext(model=student, optimizer=opt, scheduler=sched, precision=Precision("cpu", None),
                      teacher=teacher, num_classes=4)
    train_one_epoch(ctx, _loader(), alpha=0.9, progress=False)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    for k, v in teacher.state_dict().items():  # BN running stats untouched: eval mode held
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())  # student did learn


def test_freeze_teacher_message_counts_parameters(caplog):
    model = nn.Linear(10, 5)  # 55 parameters
    with caplog.at_level(logging.INFO, logger="distill"):
        logging.getLogger("distill").propagate = True
        try:
            freeze_teacher(model, verbose=True)
        finally:
            logging.getLogger("distill").propagate = False
    assert "Teacher frozen: 55/55 parameters" in caplog.text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_raises_naming_the_step(bad):
    with pytest.raises(NonFiniteLossError, match="step 127") as info:
        validate_loss(torch.tensor(bad), step=127)
    assert info.value.step == 127
    assert validate_loss(torch.tensor(bad), step=3, raise_on_invalid=False) is False
    assert validate_loss(torch.tensor(1.5), step=0) is True


def test_engine_stops_on_nan_before_the_optimizer_step():
    student = _cnn()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ctx = StepContext(model=student, optimizer=opt, scheduler=sched, precision=Precision("cpu", None), num_classes=4)
    loader = _loader()
    x, y = loader[2]
    loader[2] = (x * float("nan"), y)
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(ctx, loader, alpha=0.0, progress=False)
    assert info.value.step == 2
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_alpha_schedule_values():
    got = [round(schedule_kd_alpha(e, 100), 1) for e in (1, 25, 50, 75, 100)]
    assert got == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert schedule_kd_alpha(1, 1) == 0.9
    assert schedule_kd_alpha(10, 10, 1.0, 0.0) == 0.0
    with pytest.raises(ValueError):
        schedule_kd_alpha(0, 10)
    with pytest.raises(ValueError):
        schedule_kd_alpha(1, 10, alpha_start=1.5)


@pytest.mark.parametrize("name,factor", [
    ("resnet50", 1.0), ("resnet34", 0.75), ("resnet18", 0.5),
    ("vit_base_patch16_224", 1.0), ("vit_small_patch16_224", 0.75), ("vit_tiny_patch16_224", 0.5),
    ("hf:google/vit-base-patch16-224", 1.0),
])
def test_lr_factor_from_model_name(name, factor):
    assert get_model_specific_lr(name, 0.001) == pytest.approx(0.001 * factor)


def test_lr_factor_explicit_role_wins_and_unknown_is_one():
    assert get_model_specific_lr("resnet50", 0.01, role="student") == pytest.approx(0.005)
    assert get_model_specific_lr("convnext_tiny", 0.01) == pytest.approx(0.01)
    assert LR_FACTORS == {"teacher": 1.0, "assistant": 0.75, "student": 0.5}
    with pytest.raises(ValueError):
        get_model_specific_lr("resnet18", 0.01, role="boss")


def test_cleanup_releases_optimizer_state_and_weights_even_with_outside_references():
    model = _cnn()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    opt.step()
    state_ref = weakref.ref(next(iter(opt.state.values()))["exp_avg"])
    weight = model[0].weight
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    grad_bytes = weight_bytes
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    report = cleanup_training_state(model=model, optimizer=opt, verbose=False)
    gc.collect()
    assert state_ref() is None, "optimizer state tensor still alive"
    assert weight.numel() == 0 and weight.grad is None
    assert len(opt.state) == 0 and opt.param_groups == []
    expected = (weight_bytes + grad_bytes + state_bytes + buffer_bytes) / 2**20
    assert report["released_mb"] == pytest.approx(expected)


def test_peak_memory_helpers_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    assert reset_peak_memory_stats() is False
    assert peak_memory_mb() == 0.0


@requires_cuda
def test_cleanup_frees_cuda_memory():
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(torch.cuda.current_device())
    model = nn.Linear(2048, 2048).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 2048, device="cuda")).sum().backward()
    opt.step()
    assert torch.cuda.memory_allocated() - base > 4 * 2048 * 2048 * 3
    report = cleanup_training_state(model=model, optimizer=opt, verbose=False)
    assert report["cuda"] and report["allocated_mb_after"] * 2**20 - base < 1024 * 1024


@requires_cuda
def test_peak_memory_reset_is_per_epoch():
    """gpu_memory_mb is the peak memory *reserved* by the caching allocator since the epoch's reset
    (what a 6 GB card runs out of). The reset empties the cache, so a block freed in an earlier
    epoch no longer counts."""
    dev = torch.device("cuda", torch.cuda.current_device())
    reset_peak_memory_stats(dev)
    base = torch.cuda.memory_reserved(dev) / 2**20
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    del x
    assert peak_memory_mb(dev) >= base + 256
    assert torch.cuda.memory_reserved(dev) / 2**20 >= base + 256  # still cached after del
    reset_peak_memory_stats(dev)
    assert peak_memory_mb(dev) < base + 256


# ------------------------------------------------------------------ gradient checkpointing
def _tiny_timm_vit():
    import timm
    return timm.create_model("vit_base_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=2,
                             num_heads=2, num_classes=3)


def _is_timm_block(m):
    return type(m).__name__ == "Block"


def test_checkpointing_really_recomputes_blocks_in_timm_vit():
    model = _tiny_timm_vit()
    x = torch.randn(2, 3, 16, 16)
    assert count_block_recomputation(model, x, _is_timm_block) == (2, 0)
    assert enforce_gradient_checkpointing(model, "vit_base_patch16_224", verbose=False) is True
    assert gradient_checkpointing_active(model)
    fwd, recomputed = count_block_recomputation(model, x, _is_timm_block)
    assert (fwd, recomputed) == (2, 2), "blocks were not recomputed in backward"


def test_checkpointing_really_recomputes_layers_in_transformers_vit():
    from src.models import create_model
    model = create_model("hf:vit", 3, image_size=16, patch_size=8,
                         model_kwargs=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    is_layer = lambda m: type(m).__name__ == "ViTAttention"  # inside the checkpointed layer  # noqa: E731
    x = torch.randn(2, 3, 16, 16)
    assert count_block_recomputation(model, x, is_layer)[1] == 0
    assert enforce_gradient_checkpointing(model, "hf:vit", verbose=False, force=True) is True
    assert count_block_recomputation(model, x, is_layer)[1] == 2


def test_checkpointing_left_alone_for_small_models_unless_forced():
    model = _tiny_timm_vit()
    assert enforce_gradient_checkpointing(model, "vit_tiny_patch16_224", verbose=False) is False
    assert not gradient_checkpointing_active(model)
    assert enforce_gradient_checkpointing(model, "vit_tiny_patch16_224", verbose=False, force=True) is True


def test_checkpointing_warns_loudly_when_impossible(caplog):
    logging.getLogger("distill").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="distill"):
            assert enforce_gradient_checkpointing(nn.Linear(2, 2), "vit_base", verbose=True) is False
    finally:
        logging.getLogger("distill").propagate = False
    assert "could NOT be enabled" in caplog.text


@requires_cuda
def test_checkpointing_reduces_activation_memory_on_gpu():
    from src.utils.training_guards import _activation_peak_mb
    import timm
    model = timm.create_model("vit_small_patch16_224", img_size=64, patch_size=8, num_classes=10).cuda()
    x = torch.randn(32, 3, 64, 64, device="cuda")
    before = _activation_peak_mb(model, x)
    enforce_gradient_checkpointing(model, "vit_small", verbose=False, force=True)
    after = _activation_peak_mb(model, x)
    assert after < 0.7 * before


def test_self_test_script_runs():
    import subprocess
    import sys
    from tests.conftest import ROOT
    out = subprocess.run([sys.executable, str(ROOT / "src/utils/training_guards.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Alpha schedule (epoch 1, 25, 50, 75, 100): [0.9, 0.8, 0.7, 0.6, 0.5]" in out.stdout
    assert "✅ All safety guards working!" in out.stdout
