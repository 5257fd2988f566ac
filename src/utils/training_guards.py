"""The seven training guards of the user's spec (critical-fixes.md), each checking its effect.

    freeze_teacher                  fix 1: eval mode (locked) + requires_grad=False, counted
    enforce_gradient_checkpointing  fix 2: switched on for ViT-Base and verified on the model
    cleanup_training_state          fix 3: optimizer state and weights released, memory measured
    schedule_kd_alpha               fix 4: alpha 0.9 -> 0.5, linear over epochs 1..N
    reset_peak_memory_stats         fix 6: per-epoch peak memory
    validate_loss                   fix 7: NaN/Inf stops training with a diagnostic
    get_model_specific_lr           fix 9: LR factor 1.0 / 0.75 / 0.5 by role

Everything works without CUDA. `python src/utils/training_guards.py` runs the self-test.
"""
from __future__ import annotations

import gc
import math
import sys
import types
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script (the spec's self-test): import as src.utils.training_guards would
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "src.utils"  # noqa: A001 (PEP 366: the package the relative imports below resolve in)
    import src.utils  # noqa: F401

from .devices import MiB, cuda_index, is_cuda, memory_now, peak_reserved_bytes, reset_peak_reserved, synchronize
from .errors import NonFiniteLossError
from .logger import get_console

_log = get_console()
MB = MiB  # the messages' "MB" are MiB, as nvidia-smi's


# --------------------------------------------------------------------------- fix 1
def _locked_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for a frozen teacher's .train(): it stays in eval mode whatever is asked."""
    return nn.Module.train(self, False)


def freeze_teacher(model: nn.Module, verbose: bool = True) -> nn.Module:
    """Put `model` in eval mode and stop gradients to all of its parameters.

    The eval mode is locked: a later `model.train()` (for instance from code that walks all
    modules) leaves it in eval mode, so dropout / batch-norm statistics of the teacher never
    change during the student's training. Returns the model.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    for m in model.modules():
        m.train = types.MethodType(_locked_train, m)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    in_eval = not any(m.training for m in model.modules())
    if frozen != total or not in_eval:  # cannot happen unless a module overrides requires_grad_
        raise RuntimeError(f"freeze_teacher failed: {frozen}/{total} frozen, eval={in_eval}")
    if verbose:
        # Each frozen fp32 parameter is a gradient buffer (4 bytes) that autograd never allocates.
        _log.info(f"❄️  Teacher frozen: {frozen:,}/{total:,} parameters\n"
                  f"   Mode: eval(), requires_grad=False\n"
                  f"   VRAM saved: ~{frozen * 4 / 1e6:.1f} MB (FP32)")
    return model


# --------------------------------------------------------------------------- fix 2
_CKPT_METHODS = ("gradient_checkpointing_enable", "enable_gradient_checkpointing", "set_grad_checkpointing")


def _normalize(name: str) -> str:
    return name.lower().replace("-", "_").replace("/", "_")


def requires_gradient_checkpointing(model_name: str) -> bool:
    """ViT-Base is the model the spec says must always train with checkpointing."""
    n = _normalize(model_name)
    return "vit_base" in n or "deit_base" in n


def gradient_checkpointing_active(model: nn.Module) -> bool:
    """Read the model's own flag (timm: `grad_checkpointing`; transformers: `is_gradient_checkpointing`)."""
    if getattr(model, "is_gradient_checkpointing", False):
        return True
    return any(getattr(m, "grad_checkpointing", False) is True for m in model.modules())


def count_block_recomputation(model: nn.Module, sample: torch.Tensor, block_filter: Callable[[nn.Module], bool]) -> tuple[int, int]:
    """Measure checkpointing by its effect: how often blocks run forward in one training step.

    Counts calls of the modules selected by `block_filter` during a forward and a backward
    pass of `sample` in train mode, and returns (calls during forward, calls during backward).
    With checkpointing active the second number is > 0: activations were dropped and
    recomputed. The counting wrappers are removed and gradients cleared afterwards.
    """
    counts = {"phase": "forward", "forward": 0, "backward": 0}
    # Wrap forward itself: torch runs checkpoint recomputation with module hooks silenced.
    wrapped = [m for m in model.modules() if block_filter(m)]
    for m in wrapped:
        def counting_forward(*args, _orig=m.forward, **kwargs):
            counts[counts["phase"]] += 1
            return _orig(*args, **kwargs)
        m.forward = counting_forward
    was_training = model.training
    try:
        model.train()
        out = model(sample)
        out = out.logits if hasattr(out, "logits") else out
        counts["phase"] = "backward"
        out.float().sum().backward()
    finally:
        for m in wrapped:
            del m.forward
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return counts["forward"], counts["backward"]


def _activation_peak_mb(model: nn.Module, sample: torch.Tensor) -> float:
    """Peak memory allocated above the baseline during one forward + backward of `sample` (CUDA)."""
    index = cuda_index(sample.device)
    torch.cuda.synchronize(index)
    torch.cuda.reset_peak_memory_stats(index)
    base = torch.cuda.memory_allocated(index)
    out = model(sample)
    out = out.logits if hasattr(out, "logits") else out
    out.float().sum().backward()
    torch.cuda.synchronize(index)
    peak = torch.cuda.max_memory_allocated(index) - base
    model.zero_grad(set_to_none=True)
    return peak / MB


def describe_checkpointing_saving(measured: Optional[dict]) -> str:
    """One line from the planner's probes of the stage's real micro-batch and image size:
    measured = {micro_batch, image_size, with_gib, without_gib (None: did not fit), budget_gib}."""
    if not measured:
        return "Memory savings: not measured (measured by the planner on CUDA only)"
    where = f"one training step at micro-batch {measured['micro_batch']}, {measured['image_size']} px"
    with_gib, without = measured["with_gib"], measured.get("without_gib")
    if without is None:
        return (f"Memory savings: without checkpointing {where} does not fit the {measured.get('budget_gib', '?')} GiB "
                f"budget; with it {with_gib:.2f} GiB peak reserved (measured)")
    saved = 100 * (1 - with_gib / without) if without > 0 else 0.0
    return f"Memory savings: {saved:.0f}% measured ({without:.2f} GiB -> {with_gib:.2f} GiB peak reserved, {where})"


def enforce_gradient_checkpointing(model: nn.Module, model_name: str, verbose: bool = True,
                                   force: bool = False, sample_input: Optional[torch.Tensor] = None,
                                   measured: Optional[dict] = None) -> bool:
    """Switch gradient checkpointing on for ViT-Base (or any model with `force=True`) and verify it.

    Tries `gradient_checkpointing_enable()`, `enable_gradient_checkpointing()` and
    `set_grad_checkpointing()` in turn. Success is read from the model's own flag, not assumed.
    With `sample_input` on a CUDA model, the peak activation memory of one training step is
    measured with and without checkpointing and reported; `measured` instead hands in the
    planner's probe of the stage's real micro-batch and image size (see
    describe_checkpointing_saving), which is the figure that matters. Returns True when checkpointing is
    active; warns loudly and returns False when no method worked. Models that do not need it
    (and no `force`) are left unchanged and False is returned.
    """
    if not (force or requires_gradient_checkpointing(model_name)):
        return False
    before_mb = None
    if sample_input is not None and sample_input.is_cuda:
        before_mb = _activation_peak_mb(model, sample_input)
    used = None
    for method in _CKPT_METHODS:
        fn = getattr(model, method, None)
        if callable(fn):
            try:
                fn()
            except Exception as exc:  # a method that exists but refuses; try the next one
                _log.warning(f"   {method}() failed on {model_name}: {exc}")
                continue
            if gradient_checkpointing_active(model):
                used = method
                break
    if used is None:
        _log.warning(f"⚠️  WARNING: gradient checkpointing could NOT be enabled for {model_name}.\n"
                     f"   None of {', '.join(m + '()' for m in _CKPT_METHODS)} worked on {type(model).__name__}.\n"
                     f"   Expect much higher activation memory: lower the batch size or risk OOM.")
        return False
    if verbose:
        lines = [f"✅ Gradient checkpointing enforced for {model_name} (via {used}())"]
        if before_mb is not None:
            after_mb = _activation_peak_mb(model, sample_input)
            saved = 100 * (1 - after_mb / before_mb) if before_mb > 0 else 0.0
            lines.append(f"   Memory savings: {saved:.0f}% measured "
                         f"({before_mb:.0f} MB -> {after_mb:.0f} MB for one step of batch {sample_input.shape[0]})")
        else:
            lines.append("   " + describe_checkpointing_saving(measured))
        lines.append("   Speed impact: each block's forward runs again during backward")
        _log.info("\n".join(lines))
    return True


# --------------------------------------------------------------------------- fix 3
def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def cleanup_training_state(model: Optional[nn.Module] = None, optimizer=None, scheduler=None, scaler=None,
                           verbose: bool = True, device=None) -> dict:
    """Release everything a finished stage holds, even where the caller still has references.

    1. model: every parameter, gradient and buffer is replaced by an empty tensor, so its
       storage is freed (the module object is left empty and must not be used again);
    2. optimizer: per-parameter state (e.g. AdamW's exp_avg / exp_avg_sq) and param groups cleared;
    3. scheduler / scaler: their state dicts emptied;
    4. gc.collect(), then torch.cuda.empty_cache() when CUDA is present.

    Returns the measurement: bytes of tensors released, and CUDA allocated / reserved MB before
    and after on `device` (default: the model's device; 0 without CUDA).
    """
    if device is None and model is not None:
        device = next((t.device for t in model.parameters()), None)
    cuda = torch.cuda.is_available() and device is not None and is_cuda(device)
    before = memory_now(device if cuda else "cpu")

    # ---- empty what the stage held, counting the bytes
    released, done = 0, []
    if model is not None:
        released += _empty_model(model)
        done.append("model")
    if optimizer is not None:
        released += _tensor_bytes(list(optimizer.state.values()))
        optimizer.state.clear()
        optimizer.param_groups.clear()
        done.append("optimizer")
    if scheduler is not None:
        scheduler.__dict__.pop("optimizer", None)
        done.append("scheduler")
    if scaler is not None:
        for attr in ("_scale", "_growth_tracker", "_per_optimizer_states"):
            if hasattr(scaler, attr):
                setattr(scaler, attr, None if attr != "_per_optimizer_states" else {})
        done.append("scaler")

    # ---- return the memory to the device and measure it
    gc.collect()
    if cuda:
        synchronize(device)
        torch.cuda.empty_cache()
    after = memory_now(device if cuda else "cpu")
    report = {
        "released_mb": released / MB,
        "cuda": cuda,
        "allocated_mb_before": before["allocated_mib"], "allocated_mb_after": after["allocated_mib"],
        "reserved_mb_before": before["reserved_mib"], "reserved_mb_after": after["reserved_mib"],
    }
    if verbose:
        _log.info(_cleanup_message(report, done))
    return report


def _empty_model(model: nn.Module) -> int:
    """Replace every parameter, gradient and buffer by an empty tensor; the bytes they held."""
    released = 0
    for module in model.modules():
        for p in module._parameters.values():
            if p is None:
                continue
            released += _tensor_bytes(p.data) + _tensor_bytes(p.grad)
            p.grad = None
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        for name, b in list(module._buffers.items()):
            if b is not None:
                released += _tensor_bytes(b)
                module._buffers[name] = torch.empty(0, dtype=b.dtype, device=b.device)
    return released


def _cleanup_message(report: dict, done: list) -> str:
    lines = ["🧹 Cleaning up training state..."]
    lines += [f"   ✓ Deleted {what}" for what in done]
    lines.append(f"   ✓ Released {report['released_mb']:.1f} MB of tensors (measured)")
    if report["cuda"]:
        lines.append("   ✓ CUDA cache cleared")
        lines.append(f"   Current memory: {report['allocated_mb_after']:.1f} MB allocated, "
                     f"{report['reserved_mb_after']:.1f} MB reserved "
                     f"(was {report['allocated_mb_before']:.1f} / {report['reserved_mb_before']:.1f})")
    else:
        lines.append("   No CUDA device: nothing to clear on a GPU")
    return "\n".join(lines)


# --------------------------------------------------------------------------- fix 7
_NAN_HELP = ("   This indicates:\n"
             "   - Learning rate too high\n"
             "   - Gradient explosion\n"
             "   - Numerical instability\n"
             "   - Bad initialization\n"
             "   Action: Reduce learning rate or check data")


def validate_loss(loss: torch.Tensor, step: int, raise_on_invalid: bool = True, verbose: bool = True) -> bool:
    """Return True when `loss` (a scalar tensor or number) is finite.

    On NaN / Inf: logs the diagnostic (with `verbose`) and raises NonFiniteLossError (a
    RuntimeError carrying `step` and `value`), or returns False when `raise_on_invalid=False`.
    """
    value = float(loss.detach().float().item()) if torch.is_tensor(loss) else float(loss)
    if math.isfinite(value):
        return True
    message = f"❌ NON-FINITE LOSS DETECTED at step {step}\n   Loss value: {value}\n{_NAN_HELP}"
    if verbose:
        _log.error(message)
    if raise_on_invalid:
        raise NonFiniteLossError(message, step=step, value=value)
    return False


class LossWatch:
    """validate_loss without a host sync per step, for a training loop on a GPU.

    `update(loss, step)` keeps, on the device, whether any loss so far was non-finite and the
    first such step and value; it returns that flag as a float tensor, which a fused optimizer
    takes as `found_inf` to make its update a no-op. `check()` reads the flag (one host sync)
    and, when set, calls validate_loss with the first bad step and value, which raises.
    """

    def __init__(self, device, verbose: bool = True):
        self.verbose = verbose
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_value = torch.zeros((), dtype=torch.float32, device=device)
        self.first_grad_norm = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, loss: torch.Tensor, step: int, reduce: Optional[Callable] = None,
               grad_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`grad_norm`: the step's total gradient norm, watched too (a finite loss can still give
        non-finite gradients, which an update would write into the weights). `reduce`
        (distributed runs) makes the flag the maximum over ranks, in place."""
        loss = loss.detach().float()
        bad_now = ~torch.isfinite(loss)
        norm = grad_norm.detach().float() if grad_norm is not None else torch.zeros_like(loss)
        bad_now = bad_now | ~torch.isfinite(norm)
        if reduce is not None:
            flag = bad_now.float()
            reduce(flag)
            bad_now = flag > 0
        new = bad_now & ~self.bad
        self.first_step = torch.where(new, step, self.first_step)
        self.first_value = torch.where(new, loss, self.first_value)
        self.first_grad_norm = torch.where(new, norm, self.first_grad_norm)
        self.bad = self.bad | bad_now
        return self.bad.float()

    def check(self) -> None:
        if bool(self.bad):
            value, norm = float(self.first_value), float(self.first_grad_norm)
            if math.isfinite(value) and not math.isfinite(norm):
                check_grad_norm(norm, int(self.first_step), value, verbose=self.verbose)
            validate_loss(value if not math.isfinite(value) else float("nan"), step=int(self.first_step),
                          verbose=self.verbose)  # finite here when the bad step was on another rank


def check_grad_norm(norm, step: int, loss: float, verbose: bool = True) -> None:
    """Raise NonFiniteLossError when the total gradient norm of a step with a finite loss is NaN or Inf."""
    norm = float(norm)
    if math.isfinite(norm):
        return
    message = (f"❌ NON-FINITE GRADIENTS at step {step} (gradient norm {norm}, loss {loss:.4g} finite)\n{_NAN_HELP}")
    if verbose:
        _log.error(message)
    raise NonFiniteLossError(message, step=step, value=norm, what="gradients")


# --------------------------------------------------------------------------- fix 6
def reset_peak_memory_stats(device=None) -> bool:
    """Start a new peak-memory window on `device` (default: the current CUDA device).

    The CUDA cache is emptied first, so the next peak_memory_mb() is the peak *reserved* memory
    of the work done after this call (what a 6 GB card runs out of), not what earlier work left
    cached. Returns True when a CUDA device was reset, False without CUDA (nothing to reset).
    """
    return reset_peak_reserved(device)


def peak_memory_mb(device=None) -> float:
    """Peak CUDA memory *reserved* by the caching allocator since the last reset, in MiB; 0.0 without CUDA."""
    return peak_reserved_bytes(device) / MB


# --------------------------------------------------------------------------- fix 4
def schedule_kd_alpha(epoch: int, total_epochs: int, alpha_start: float = 0.9, alpha_end: float = 0.5) -> float:
    """Weight of the KD term at `epoch` (1-based): linear from alpha_start at epoch 1 to alpha_end at epoch N.

    With 100 epochs: epochs 1/25/50/75/100 give 0.9/0.803/0.702/0.601/0.5.
    """
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    if not 1 <= epoch <= total_epochs:
        raise ValueError(f"epoch must be in 1..{total_epochs}, got {epoch}")
    for name, a in (("alpha_start", alpha_start), ("alpha_end", alpha_end)):
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {a}")
    if total_epochs == 1:
        return float(alpha_start)
    frac = (epoch - 1) / (total_epochs - 1)
    return float(alpha_start + (alpha_end - alpha_start) * frac)


# --------------------------------------------------------------------------- fix 9
LR_FACTORS = {"teacher": 1.0, "assistant": 0.75, "student": 0.5}
_ROLE_PATTERNS = (
    ("teacher", ("resnet50", "vit_base", "deit_base")),
    ("assistant", ("resnet34", "vit_small", "deit_small")),
    ("student", ("resnet18", "vit_tiny", "deit_tiny")),
)


def role_from_model_name(model_name: str) -> Optional[str]:
    """'teacher' / 'assistant' / 'student' for the chain's default models, else None."""
    n = _normalize(model_name)
    for role, patterns in _ROLE_PATTERNS:
        if any(p in n for p in patterns):
            return role
    return None


def get_model_specific_lr(model_name: str, base_lr: float, role: Optional[str] = None) -> float:
    """base_lr times 1.0 (teacher), 0.75 (assistant) or 0.5 (student).

    An explicit `role` wins; otherwise the role is recognised from the model name
    (ResNet-50 / ViT-Base -> teacher, ResNet-34 / ViT-Small -> assistant, ResNet-18 / ViT-Tiny
    -> student). A model that is neither gets 1.0 and a warning.
    """
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if role is not None and role not in LR_FACTORS:
        raise ValueError(f"role must be one of {sorted(LR_FACTORS)}, got {role!r}")
    role = role or role_from_model_name(model_name)
    if role is None:
        _log.warning(f"⚠️  No LR role known for {model_name!r}: using factor 1.0 (set `role:` in the stage to choose)")
        return float(base_lr)
    return float(base_lr * LR_FACTORS[role])


# --------------------------------------------------------------------------- self-test
def _self_test() -> None:
    """The spec's self-test; every ✓ is printed only after its check passed."""
    print("Testing training safety guards...\n")
    torch.manual_seed(0)

    print("[1/4] Testing teacher freezing...")
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 4))
    student = nn.Linear(8, 4)
    freeze_teacher(teacher, verbose=False)
    teacher.train()  # must not unfreeze
    x = torch.randn(5, 8)
    t_out = teacher(x)
    assert not t_out.requires_grad, "teacher output carries a graph"
    assert torch.equal(t_out, teacher(x)), "teacher is not deterministic (dropout active)"
    loss = (student(x) - t_out).pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()), "gradient reached the teacher"
    assert student.weight.grad is not None
    print("✓ Teacher freezing works\n")

    print("[2/4] Testing loss validation...")
    assert validate_loss(torch.tensor(0.5), step=0) is True
    print("✓ Valid loss passes\n")

    print("[3/4] Testing NaN detection...")
    try:
        validate_loss(torch.tensor(float("nan")), step=127)
    except NonFiniteLossError as exc:
        assert exc.step == 127
        print(f"✓ NaN detected and caught: step {exc.step}, value {exc.value}\n")
    else:
        raise AssertionError("NaN loss was not detected")

    print("[4/4] Testing alpha scheduling...")
    alphas = [round(schedule_kd_alpha(e, 100), 1) for e in (1, 25, 50, 75, 100)]
    print(f"Alpha schedule (epoch 1, 25, 50, 75, 100): {alphas}")
    assert alphas == [0.9, 0.8, 0.7, 0.6, 0.5], alphas
    print("✓ Alpha scheduling works\n")
    print("✅ All safety guards working!")


if __name__ == "__main__":
    _self_test()
