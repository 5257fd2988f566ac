"""The training step: sync-free NaN guard, compile warm-up, honest train metrics, loss terms, teacher prep."""
import contextlib

import pytest
import torch
from torch import nn

from src.spec.config import TrainConfig
from src.distillation.engine import Precision, StepContext, compile_warmup, prepare_teacher, train_one_epoch
from src.distillation.recipe import lr_schedule, warmup_steps_for
from src.distillation.recipe import make_optimizer
from src.utils.errors import NonFiniteLossError


class _Loader(list):
    batch_size = 16

    def set_epoch(self, e):
        pass


def _loader(n=96, bs=16, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 3, 8, 8, generator=g)
    ys = torch.randint(0, classes, (n,), generator=g)
    return _Loader([(xs[i:i + bs], ys[i:i + bs]) for i in range(0, n, bs)])


def _cnn(classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def _ctx(model, optimizer="adamw", **kw):
    opt = make_optimizer(model, 1e-2, 0.01, torch.device("cpu"), optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return StepContext(model=model, optimizer=opt, scheduler=sched, precision=Precision("cpu", None), num_classes=4, **kw)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_the_optimizer_is_fused_so_the_nan_guard_needs_no_sync(kind):
    opt = make_optimizer(_cnn(), 1e-3, 0.0, torch.device("cpu"), kind, momentum=0.9)
    assert getattr(opt, "_step_supports_amp_scaling", False)
    assert isinstance(opt, torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)
    if kind == "sgd":
        assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    with pytest.raises(ValueError, match="adamw, sgd"):
        make_optimizer(_cnn(), 1e-3, 0.0, torch.device("cpu"), "lamb")


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_nan_guard_without_sync_skips_every_step_from_the_bad_one_and_names_it(kind):
    """The host reads the flag only every 50 steps (here: at the end of the epoch), yet no optimizer
    step is taken on the NaN step or after it, and the error names the first bad step."""
    loader = _loader()
    bad = _Loader(loader)
    x, y = bad[2]
    bad[2] = (x * float("nan"), y)
    model = _cnn()
    ctx = _ctx(model, kind)
    torch.manual_seed(1)
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(ctx, bad, alpha=0.0, progress=False)
    assert info.value.step == 2
    # the same model trained on the two good batches before it only
    ref = _cnn()
    torch.manual_seed(1)
    train_one_epoch(_ctx(ref, kind), _Loader(loader[:2]), alpha=0.0, progress=False)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_nan_check_period_is_honoured():
    loader = _loader(n=160)
    x, y = loader[1]
    loader[1] = (x * float("inf"), y)
    seen = []

    class Spy(_Loader):
        def __iter__(self):
            for i, b in enumerate(list.__iter__(self)):
                seen.append(i)
                yield b
    ctx = _ctx(_cnn(), nan_check_every=4)
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(ctx, Spy(loader), alpha=0.0, progress=False)
    assert info.value.step == 1 and seen == [0, 1, 2, 3]  # stopped at the first read after the bad step


def test_compile_warmup_leaves_weights_buffers_grads_and_rng_untouched():
    model = _cnn()
    ctx = _ctx(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sample = torch.randn(16, 3, 8, 8)
    rng = torch.get_rng_state()
    seconds = compile_warmup(ctx, sample)
    assert seconds >= 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN running stats restored
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_metrics_under_mixup_score_against_the_mixed_target():
    """Images carry their one-hot label in the pixels; mixup mixes pixels and targets with the same
    lambda, so a model reading the pixels predicts the larger share of every mix: 100% by the
    mixed target, about 3/4 by the unmixed labels (what was logged before)."""
    from timm.data import Mixup
    classes, n = 4, 256
    y = torch.arange(n) % classes
    x = torch.zeros(n, 3, 8, 8)
    x[torch.arange(n), 0, 0, y] = 1.0

    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, img):
            return img[:, 0, 0, :classes] * 10 + self.w * 0

    loader = _Loader([(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)])
    mix = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=classes)
    import numpy as np
    np.random.seed(0)
    out = train_one_epoch(_ctx(Reader(), mixup=mix), loader, alpha=0.0, progress=False)
    assert out["accuracy"] > 0.99


def test_loss_terms_are_reported_beside_the_objective():
    teacher = prepare_teacher(_cnn(seed=3), torch.device("cpu"), Precision("cpu", None), False)
    out = train_one_epoch(_ctx(_cnn(), teacher=teacher), _loader(), alpha=0.7, progress=False)
    assert out["loss"] == pytest.approx(0.3 * out["ce"] + 0.7 * out["kd"], rel=1e-5)
    plain = train_one_epoch(_ctx(_cnn()), _loader(), alpha=0.0, progress=False)
    assert plain["loss"] == pytest.approx(plain["ce"]) and plain["kd"] != plain["kd"]  # NaN: no KD term
    assert plain["steps"] == 6 and plain["lr_first"] == plain["lr_last"] == pytest.approx(1e-2)


def test_bf16_teacher_gives_the_logits_autocast_gives():
    """Casting a frozen teacher's conv/linear weights to bf16 once is what autocast does on every
    forward: identical logits, half the weight reads."""
    teacher = _cnn(seed=5).eval()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = teacher(x)
    cast = prepare_teacher(teacher, torch.device("cpu"), Precision("cpu", torch.bfloat16), False)
    assert cast[0].weight.dtype == torch.bfloat16 and cast[1].weight.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = cast(x)
    assert torch.equal(before, after)


def test_warmup_is_capped_so_a_short_run_reaches_its_peak_and_decays():
    # 3 epochs of 10 steps with the ViT preset's 5 warm-up epochs
    assert warmup_steps_for(5, 10, 30) == 6
    lrs = lr_schedule(1e-3, TrainConfig(warmup_epochs=5, min_lr_ratio=0.01), 3, 10)
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] < 0.05 * 1e-3
    assert warmup_steps_for(2, 100, 4000) == 200  # a long run keeps its configured warm-up


@contextlib.contextmanager
def console_messages():
    """The messages the project's console logger emits inside the block (a list, filled as they come)."""
    import logging
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
    handler = Keep()
    logging.getLogger("distill").addHandler(handler)
    try:
        yield seen
    finally:
        logging.getLogger("distill").removeHandler(handler)


def test_progress_prints_lines_when_not_on_a_terminal(monkeypatch):
    from src.distillation import engine
    monkeypatch.setattr(engine.sys.stdout, "isatty", lambda: False, raising=False)
    with console_messages() as seen:
        bar = engine.Progress(10, "teacher 1/3", enabled=True, every_s=0.0)
        for step in range(3):
            bar.update(step, 32 * (step + 1), lambda: 1.5)
    lines = [m for m in seen if "teacher 1/3" in m]
    assert len(lines) == 3 and "step 3/10" in lines[-1] and "left" in lines[-1]
    assert engine.Progress(10, "x", enabled=False).lines is False  # --no-progress: silent


class _HostReads:
    """Counts values read back to the host (.item(), float(), bool() of a tensor all dispatch to
    aten._local_scalar_dense): on a GPU each one is a synchronisation."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    outer.count += 1
                return func(*args, **(kwargs or {}))
        self.count, self.mode = 0, Mode()


def _reads_in_loop(n_batches: int, every: int) -> int:
    """Host reads between the first batch and the loader's end, in an epoch with a teacher, KD,
    gradient clipping and a progress display that is due to redraw."""
    reads = _HostReads()
    marks = []

    class Counted(_Loader):
        def __iter__(self):
            for b in list.__iter__(self):
                marks.append(reads.count)
                yield b
            marks.append(reads.count)
    teacher = _cnn(seed=1).eval()
    ctx = _ctx(_cnn(), teacher=teacher, grad_clip=1.0, nan_check_every=every)
    with reads.mode:
        train_one_epoch(ctx, Counted(_loader(n=16 * n_batches)), alpha=0.5, progress=False)
    return marks[-1] - marks[0]


def test_training_steps_read_nothing_back_but_the_periodic_nan_check():
    for n in (4, 12):
        checks = sum(1 for s in range(n) if (s + 1) % 4 == 0 or s == n - 1)
        assert _reads_in_loop(n, every=4) == checks, n


def test_allocator_retries_at_the_memory_cap_are_counted_and_said_once(tmp_path, monkeypatch):
    """Each flush of the CUDA cache at the cap is a synchronisation: a stage whose epochs hit it
    says so once (console) and counts them all (stage.json)."""
    import json
    from src.distillation import stage as stage_mod
    from src.distillation.chain import run_chain
    from tests.conftest import tiny_cfg
    counter = iter(range(0, 10_000, 3))
    monkeypatch.setattr(stage_mod, "alloc_retries", lambda device: next(counter))  # +3 between any two reads
    with console_messages() as seen:
        run_chain(tiny_cfg(train__epochs=2, stages=[{"name": "teacher", "model": "resnet10t", "role": "teacher"}]),
                  tmp_path / "run", progress=False)
    warnings = [m for m in seen if "memory is tight" in m]
    assert len(warnings) == 1 and "epoch 1" in warnings[0] and "3 time(s)" in warnings[0]
    assert json.loads((tmp_path / "run" / "teacher" / "stage.json").read_text())["alloc_retries"] == 6


class _NanGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient in backward when `poison` (the loss stays finite)."""
    @staticmethod
    def forward(ctx, h, poison: bool):
        ctx.poison = poison
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        return (g * float("nan") if ctx.poison else g), None


class _Poisonable(nn.Module):
    """_cnn whose first conv gets NaN gradients on batches whose first pixel is exactly 1234."""
    def __init__(self):
        super().__init__()
        self.net = _cnn()

    def forward(self, x):
        poison = bool(x.reshape(-1)[0] == 1234.0)
        h = _NanGrad.apply(self.net[0](x), poison)
        for layer in list(self.net)[1:]:
            h = layer(h)
        return h


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_gradients_with_a_finite_loss_never_reach_the_weights(fused, monkeypatch):
    """A finite loss whose gradients are NaN: the update is skipped from that step on and the error
    names the step and says 'gradients' (device flag with a fused optimizer, host check otherwise)."""
    loader = _loader()
    bad = _Loader(loader)
    x, y = bad[2]
    x = x.clone()
    x.view(-1)[0] = 1234.0
    bad[2] = (x, y)
    model = _Poisonable()
    ctx = _ctx(model, "sgd", grad_clip=0.0)
    if not fused:
        monkeypatch.setattr(ctx.optimizer, "_step_supports_amp_scaling", False, raising=False)
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(ctx, bad, alpha=0.0, progress=False)
    assert info.value.step == 2 and info.value.what == "gradients"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ref = _Poisonable()
    train_one_epoch(_ctx(ref, "sgd", grad_clip=0.0), _Loader(loader[:2]), alpha=0.0, progress=False)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_evaluation_puts_every_ranks_images_back_in_dataset_order():
    """Two ranks' evaluation shards (every 2nd image each), joined rank by rank as the gather joins
    them: file ids, labels and predictions come back in dataset order, each image once (the
    streamed loader's distributed sampler pads a shard with a repeated image)."""
    import numpy as np
    from src.data.loaders import StreamLoader, TensorLoader
    from src.data.sources import Split
    from dataclasses import replace
    from src.distillation.engine import in_dataset_order
    from tests.conftest import tiny_cfg
    n = 7
    split = Split(labels=torch.arange(n) % 3, images=torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8))
    cfg = tiny_cfg().data
    for make in (lambda r: TensorLoader(split, 2, torch.device("cpu"), False, cfg, rank=r, world_size=2),
                 lambda r: StreamLoader(split, 2, torch.device("cpu"), False, replace(cfg, num_workers=0),
                                        from_tensors=True, rank=r, world_size=2)):
        index, labels = [], []
        for rank in (0, 1):
            loader = make(rank)
            for _, y in loader:
                index.append(loader.batch_index.numpy())
                labels.append(y.numpy())
        joined_index, joined_labels = np.concatenate(index), np.concatenate(labels)
        assert len(joined_index) >= n and not (joined_index == np.arange(len(joined_index))).all()
        order, ordered_labels = in_dataset_order(joined_index, joined_labels)
        assert order.tolist() == list(range(n)) and ordered_labels.tolist() == (np.arange(n) % 3).tolist()
