"""The planner measures; on CPU it leaves the plan alone. GPU checks run only with CUDA."""
import pytest
import torch

from src.distillation.engine import Precision
from src.distillation.planner import apply_vram_budget, measure_steps, probe_plan
from src.distillation.stage import StagePlan
from src.models import create_model
from tests.conftest import requires_cuda


def test_cpu_plan_is_left_as_configured():
    plan = StagePlan(epochs=3, batch_size=64)
    out = probe_plan(plan, model_builder=lambda: create_model("resnet10t", 10), teacher_builder=None,
                     model_name="resnet10t", image_size=16, num_classes=10, device=torch.device("cpu"),
                     precision=Precision("cpu", None), channels_last=False, budget_gb=6)
    assert (out.batch_size, out.micro_batch, out.grad_checkpointing) == (64, None, False)
    assert apply_vram_budget(torch.device("cpu"), 6) == {"capped": False}


def test_measure_steps_counts_images_over_micro_batches():
    m = measure_steps(create_model("resnet10t", 10), None, 8, 16, 10, Precision("cpu", None), False,
                      steps=1, warmup=1, full_batch=16)
    assert m["img_per_s"] > 0 and m["peak_reserved_gib"] == 0.0


@requires_cuda
def test_budget_caps_the_process_and_the_plan_fits_it():
    dev = torch.device("cuda")
    info = apply_vram_budget(dev, 2.0)
    try:
        big = 3 * 1024 ** 3
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(big, dtype=torch.uint8, device=dev)
        plan = probe_plan(StagePlan(epochs=1, batch_size=512),
                          model_builder=lambda: create_model("resnet18", 10, cifar_stem=True),
                          teacher_builder=lambda: create_model("resnet34", 10, cifar_stem=True),
                          model_name="resnet18", image_size=32, num_classes=10, device=dev,
                          precision=Precision.choose(dev, True), channels_last=True, budget_gb=2.0,
                          compile_mode="false")
        assert plan.notes and "probe:" in plan.notes[0]
        chosen = plan.micro_batch or plan.batch_size
        assert chosen <= 512
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        assert info["capped"]


@requires_cuda
def test_vit_base_keeps_checkpointing_in_the_plan():
    dev = torch.device("cuda")
    plan = probe_plan(StagePlan(epochs=1, batch_size=64),
                      model_builder=lambda: create_model("vit_base_patch16_224", 10, image_size=32, patch_size=4),
                      teacher_builder=None, model_name="vit_base_patch16_224", image_size=32, num_classes=10,
                      device=dev, precision=Precision.choose(dev, True), channels_last=False, budget_gb=6,
                      compile_mode="false")
    assert plan.grad_checkpointing is True
