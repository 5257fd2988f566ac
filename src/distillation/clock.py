"""How long the chain will take, said before its first step and kept up to date after every epoch.

Before training, each stage still to run is timed for a few steps (its model, every frozen
teacher, its method and optimizer, the stage's real batch, random data: `measure_steps`, the
planner's probe) unless the planner already measured it; validation and the test scoring after the
last epoch count as a forward pass per image, a third of a training step. The estimate covers
every stage and every seed. After each epoch the stage's own measured epoch time replaces the
probe's. Start-up (imports, data) and the report after the chain are not in it.
"""
from __future__ import annotations

from dataclasses import dataclass

SLOW_ON_CPU_S = 30 * 60   # over this on a CPU: say the preset is meant for a GPU and name those that fit
CPU_PRESETS = ("cnn_distillation/configs/demo.yaml, demo_sweep.yaml, demo_dense.yaml; "
               "vit_distillation/configs/demo.yaml, demo_sweep.yaml; or the TAKD paper's own CIFAR-10 experiment "
               "on a CPU: python benchmarks/reproduce_takd.py --slice cpu (about 40 minutes on 2 cores)")


def duration(seconds: float) -> str:
    """'40 s', '14 min', '2 h 10 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


@dataclass
class StageWork:
    name: str
    epochs_left: int
    epoch_seconds: float      # estimated (probe) until the stage has run an epoch, then measured
    test_seconds: float = 0.0  # scoring the test split after the last epoch (a forward pass per image)
    ended: bool = False

    def seconds_left(self) -> float:
        return 0.0 if self.ended else self.epochs_left * self.epoch_seconds + self.test_seconds


def whole_epoch_seconds(took: float, eval_seconds: float, steps: int, skipped: int) -> float:
    """The time a whole epoch takes, from one resumed part-way: this process took `took` seconds
    (validation `eval_seconds` of them) for the `steps - skipped` steps it ran; the skipped steps
    ran before the interruption, at no cost here, so the training part is scaled up to all `steps`."""
    if skipped <= 0 or steps <= skipped:
        return took
    return (took - eval_seconds) * steps / (steps - skipped) + eval_seconds


class ChainClock:
    """Seconds left (training, validation and the final test scoring): this seed's stages, plus `later_seeds` more runs of the whole chain."""

    def __init__(self, work: list, full_chain_seconds: float, later_seeds: int = 0):
        self.work = {w.name: w for w in work}
        self.full_chain_seconds = full_chain_seconds
        self.later_seeds = later_seeds

    def left(self) -> float:
        return sum(w.seconds_left() for w in self.work.values()) + self.later_seeds * self.full_chain_seconds

    def stage_ended(self, stage: str) -> None:
        """The stage is over (its last epoch, or an early stop): nothing of it is left."""
        if stage in self.work:
            self.work[stage].epochs_left, self.work[stage].ended = 0, True

    def epoch_done(self, stage: str, seconds: float) -> str:
        """After an epoch of `stage` that took `seconds`: the chain's time left, as text."""
        w = self.work.get(stage)
        if w is not None:
            w.epoch_seconds, w.epochs_left = seconds, max(0, w.epochs_left - 1)
        return f"chain ~{duration(self.left())} left"
