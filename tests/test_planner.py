"""The planner measures; on CPU it leaves the plan alone. GPU checks run only with CUDA."""
import pytest
import torch

from src.distillation.engine import Precision
from src.distillation.planner import apply_vram_budget, measure_steps, probe_plan
from src.distillation.stage import StagePlan
from src.models import create_model
from tests.conftest import requires_cuda


def test_cpu_plan_is_left_as_configured(monkeypatch):
    from src.distillation import planner
    compiled = []  # compile=auto on a CPU measures torch.compile against eager (a minute here): recorded, not run
    monkeypatch.setattr(planner, "_probe_compile", lambda p, eager, *a, **k: compiled.append(eager) or p)
    plan = StagePlan(epochs=3, batch_size=64)
    out = probe_plan(plan, model_builder=lambda: create_model("resnet10t", 10), teacher_builder=None,
                     model_name="resnet10t", image_size=16, num_classes=10, device=torch.device("cpu"),
                     precision=Precision("cpu", None), channels_last=False, budget_gb=6)
    assert (out.batch_size, out.micro_batch, out.grad_checkpointing) == (64, None, False)
    assert len(compiled) == 1 and compiled[0]["img_per_s"] > 0  # an unknown workload: compile is measured
    assert out.probe_img_per_s == round(compiled[0]["img_per_s"], 1)
    assert apply_vram_budget(torch.device("cpu"), 6) == {"capped": False}


def test_measure_steps_counts_images_over_micro_batches():
    m = measure_steps(create_model("resnet10t", 10), None, 8, 16, 10, Precision("cpu", None), False,
                      steps=1, warmup=1, full_batch=16)
    assert m["img_per_s"] > 0 and m["peak_reserved_gib"] == 0.0


@requires_cuda
def test_budget_caps_the_process_and_the_plan_fits_it():
    dev = torch.device("cuda")  # un-indexed on purpose: the budget must resolve it
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
        assert any("probe:" in n for n in plan.notes)
        # ResNet-18 has batch norm: the full batch is kept (with checkpointing if needed) whenever it fits
        assert plan.batchnorm is True
        assert plan.probe_peak_gib <= 2.0 - 0.5
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
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
    mem = plan.ckpt_memory  # measured at the chosen micro-batch and image size, for the guard's message
    assert mem["micro_batch"] == (plan.micro_batch or 64) and mem["image_size"] == 32
    assert mem["without_gib"] is None or mem["without_gib"] > mem["with_gib"]


def _fake_prober(table, batch=256, limit=5.5):
    """The planner's search with a memory/speed table instead of a GPU: (micro, ckpt) -> (img/s, GiB)."""
    from src.distillation.planner import _Prober

    class Fake(_Prober):
        def __call__(self, micro, ckpt):
            speed, gib = table.get((micro, ckpt), (0.0, float("inf")))
            trial = {"micro_batch": micro, "grad_ckpt": ckpt, "img_per_s": speed, "peak_reserved_gib": gib,
                     "fits": gib <= limit}
            self.trials.append(trial)
            return trial
    return Fake(None, None, "m", 32, 10, torch.device("cpu"), None, False, batch, limit)


# the full batch fits only with checkpointing; micro-batches of 128 fit without it and run faster
TABLE = {(256, False): (0, 7.0), (256, True): (9000, 4.0), (128, False): (12000, 3.6), (128, True): (8000, 2.1),
         (64, False): (10000, 2.0), (64, True): (7000, 1.2)}


def test_batchnorm_models_keep_the_full_batch_with_checkpointing_rather_than_micro_batches():
    best, why = _fake_prober(TABLE).find("resnet18", batchnorm=True, forced=False)
    assert (best["micro_batch"], best["grad_ckpt"]) == (256, True) and "BatchNorm" in why


def test_layernorm_models_take_the_fastest_fitting_setting():
    best, _ = _fake_prober(TABLE).find("vit_small", batchnorm=False, forced=False)
    assert (best["micro_batch"], best["grad_ckpt"]) == (128, False)


def test_forced_checkpointing_grows_only_the_micro_batch():
    best, _ = _fake_prober(TABLE).find("vit_base", batchnorm=False, forced=True)
    assert (best["micro_batch"], best["grad_ckpt"]) == (256, True)


def test_checkpointing_message_reports_the_stage_measurement():
    from src.utils.training_guards import describe_checkpointing_saving
    line = describe_checkpointing_saving({"micro_batch": 256, "image_size": 32, "with_gib": 1.57, "without_gib": 4.02})
    assert line == ("Memory savings: 61% measured (4.02 GiB -> 1.57 GiB peak reserved, one training step at "
                    "micro-batch 256, 32 px)")
    oom = describe_checkpointing_saving({"micro_batch": 256, "image_size": 224, "with_gib": 4.1, "without_gib": None,
                                         "budget_gib": 6.0})
    assert "does not fit the 6.0 GiB budget" in oom


def test_compile_is_kept_only_when_the_time_it_saves_exceeds_its_cost():
    from src.distillation.planner import compile_decision
    # 10% faster: over 1.8M images (40 epochs of 45k) it saves ~13 s, less than a 40 s compilation
    use, why = compile_decision(13_000, 14_300, 40.0, 1_800_000)
    assert not use and "saves 13s" in why and "costs 40s" in why
    # 30% faster on a slow stage: saves minutes, worth a 40 s compilation
    assert compile_decision(3_000, 3_900, 40.0, 1_800_000)[0]
    # under 5% faster: never, however long the stage
    assert not compile_decision(10_000, 10_400, 0.0, 10**9)[0]
    # stage length unknown: the speed gain alone decides
    assert compile_decision(10_000, 11_000, 40.0, None)[0]


def test_a_stage_too_short_to_repay_a_compilation_is_not_even_probed():
    from src.distillation.planner import COMPILE_MIN_STAGE_S, plan_compile
    probed = []

    def probe(p):
        probed.append(p)
        return p
    plan = StagePlan(epochs=3, batch_size=256)
    short = 10_000 * COMPILE_MIN_STAGE_S / 2  # half a minute of eager training at 10,000 img/s
    out = plan_compile(plan, 10_000, int(short), probe)
    assert not probed and out.compile is False and "not probed" in out.notes[-1]
    plan_compile(plan, 10_000, int(short * 4), probe)
    plan_compile(plan, 10_000, None, probe)
    assert len(probed) == 2


def test_a_reused_plan_decides_compile_for_each_stage_length(monkeypatch):
    """Stages sharing a probed plan (the student variants, later seeds) decide compile for their own
    number of epochs from the probe's figures, without probing again."""
    from src.distillation import chain
    from tests.conftest import tiny_cfg
    probed = StagePlan(epochs=1, batch_size=32, compile=True, probe_img_per_s=3000.0, probe_compiled_img_per_s=3900.0,
                       probe_compile_seconds=40.0)
    dev = torch.device("cuda", 0)  # only its name is used: the plan comes from the cache
    decisions = {}
    for epochs in (1, 40):
        cfg = tiny_cfg(train__compile="auto", train__epochs=epochs)
        stage = cfg.stage("student")
        monkeypatch.setitem(chain._PLAN_CACHE, (chain._plan_key(cfg, stage), str(dev)), probed)
        plan = chain.plan_stage(cfg, stage, dev, 10, train_images=45_000)
        decisions[epochs] = plan.compile
        assert plan.epochs == epochs and "reused" in " ".join(plan.notes)
    assert decisions == {1: False, 40: True}  # saves 3.5 s in one epoch, 140 s in forty; compiling costs 40 s


def test_the_compile_probe_measures_the_compiled_step_and_says_why(monkeypatch):
    """The probe compiles the student and times it against eager (aot_eager: no C++ compiler, seconds)."""
    import functools

    from src.distillation import planner
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    plan = StagePlan(epochs=1, batch_size=16)
    try:
        out = planner._probe_compile(plan, {"img_per_s": 1e9}, lambda: create_model("resnet10t", 10), None,
                                     "resnet10t", 16, 10, torch.device("cpu"), Precision("cpu", None), False,
                                     float("inf"), images_to_train=160)
    finally:
        torch._dynamo.reset()
    assert out.compile is False  # nothing compiled beats an eager step of 1e9 img/s
    assert out.probe_compiled_img_per_s > 0 and out.probe_compile_seconds >= 0
    assert out.notes[-1].startswith("compile: ") and out.notes[-1].endswith("-> off") and "vs eager" in out.notes[-1]
