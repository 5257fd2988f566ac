"""The CUDA paths end to end, on a tiny chain (run by `pytest -m gpu` inside benchmarks/gpu_smoke.py)."""
import json

import pytest
import torch

from src.distillation.chain import run_chain
from tests.conftest import requires_cuda, tiny_cfg


@requires_cuda
@pytest.mark.parametrize("amp_dtype", ["auto", "fp16"])
def test_tiny_chain_on_cuda(tmp_path, amp_dtype):
    cfg = tiny_cfg(train__device="cuda", train__epochs=2, train__compile="false", train__amp_dtype=amp_dtype,
                   train__vram_budget_gb=2.0)
    run_chain(cfg, tmp_path / "run", progress=False)
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["device"].startswith("cuda:") and env["vram_budget"]["capped"]
    for stage in ("teacher", "student"):
        info = json.loads((tmp_path / "run" / stage / "stage.json").read_text())
        assert info["peak_gpu_memory_mb"] > 0 and info["peak_gpu_memory_mb"] < 2.0 * 1024
        assert info["precision"] == ("fp16" if amp_dtype == "fp16" else "bf16" if torch.cuda.is_bf16_supported() else "fp16")


@requires_cuda
def test_nan_guard_without_sync_on_cuda():
    from src.distillation.engine import Precision, StepContext, train_one_epoch
    from src.distillation.recipe import make_optimizer
    from src.utils.errors import NonFiniteLossError
    dev = torch.device("cuda", torch.cuda.current_device())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).to(dev)
    opt = make_optimizer(model, 1e-2, 0.0, dev)
    assert getattr(opt, "_step_supports_amp_scaling", False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batches = [(torch.randn(16, 3, 8, 8, device=dev), torch.randint(0, 4, (16,), device=dev)) for _ in range(6)]
    batches[3] = (batches[3][0] * float("nan"), batches[3][1])

    class L(list):
        def set_epoch(self, e):
            pass
    ctx = StepContext(model=model, optimizer=opt, scheduler=sched, precision=Precision.choose(dev, True), num_classes=4)
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(ctx, L(batches), alpha=0.0, progress=False)
    assert info.value.step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@requires_cuda
def test_training_epoch_synchronises_a_fixed_number_of_times_whatever_its_length():
    """The real loader (augmentation on the GPU) and step, with a teacher and gradient clipping:
    torch's sync debug mode warns at every host synchronisation; their number must not grow with
    the number of steps (the NaN flag is read at the epoch's end here)."""
    import warnings
    from src.data.loaders import TensorLoader
    from src.data.sources import Split
    from src.spec.config import DataConfig
    from src.distillation.engine import Precision, StepContext, prepare_teacher, train_one_epoch
    from src.distillation.recipe import make_optimizer
    from src.models import create_model
    dev = torch.device("cuda", torch.cuda.current_device())
    precision = Precision.choose(dev, True)
    model = create_model("resnet10t", 10).to(dev).to(memory_format=torch.channels_last)
    teacher = prepare_teacher(create_model("resnet10t", 10), dev, precision, channels_last=True)
    n = 64 * 16
    split = Split(labels=torch.randint(0, 10, (n,)), images=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8))
    d = DataConfig(source="digits", image_size=32, augment="crop_flip", crop_padding=4, normalize="cifar")
    opt = make_optimizer(model, 1e-3, 0.05, dev)
    ctx = StepContext(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                      precision=precision, teacher=teacher, grad_clip=1.0, num_classes=10, nan_check_every=10_000)
    counts = []
    for steps in (0, 4, 16):  # the first epoch warms up (cuDNN, cuBLAS handles) and is not counted
        loader = TensorLoader(Split(labels=split.labels[:64 * max(steps, 2)], images=split.images[:64 * max(steps, 2)]),
                              64, dev, True, d, channels_last=True, seed=0)
        torch.cuda.synchronize(dev)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_one_epoch(ctx, loader, alpha=0.5, progress=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[1] == counts[2], counts


@requires_cuda
def test_compile_probe_and_a_compiled_chain_on_cuda(tmp_path):
    """torch.compile's CUDA paths: the planner's compile probe (compiled student and teacher against
    eager), then a chain trained compiled (warm-up timed apart, compiled frozen teacher)."""
    from src.distillation.engine import Precision
    from src.distillation.planner import probe_plan
    from src.distillation.stage import StagePlan
    from src.models import create_model
    dev = torch.device("cuda", torch.cuda.current_device())
    plan = probe_plan(StagePlan(epochs=1, batch_size=64), model_builder=lambda: create_model("resnet10t", 10),
                      teacher_builder=lambda: create_model("resnet10t", 10), model_name="resnet10t", image_size=16,
                      num_classes=10, device=dev, precision=Precision.choose(dev, True), channels_last=True,
                      budget_gb=2.0, compile_mode="auto")
    assert plan.probe_compiled_img_per_s and plan.probe_compiled_img_per_s > 0, plan.notes
    assert plan.probe_compile_seconds is not None and any(n.startswith("compile: ") for n in plan.notes)
    cfg = tiny_cfg(train__device="cuda", train__epochs=1, train__compile="true", train__vram_budget_gb=2.0)
    run_chain(cfg, tmp_path / "run", progress=False)
    for stage in ("teacher", "student"):
        info = json.loads((tmp_path / "run" / stage / "stage.json").read_text())
        assert info["compile"] is True and info["compile_seconds"] > 0 and info["img_per_s"] > 0
