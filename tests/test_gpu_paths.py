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
    from src.distillation.stage import make_optimizer
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
