"""What a search tunes: knobs, their ranges, and the values a finished search freezes into a stage.

    --tune 'kd.temperature=1:20:log,kd.alpha=0.05:0.95' --trials 16
    tune: {knobs: {kd.temperature: "1:20:log", kd.alpha: "0.05:0.95"}, trials: 16}

A knob sets the tuned stage only (its teachers and the other students keep their values), so the
final config says exactly what each stage trained with:
    kd.temperature       -> the stage's method_args.temperature (any method's temperature)
    kd.alpha             -> the stage's method_args.kd_alpha (a constant KD weight in place of the
                            chain's alpha_start -> alpha_end schedule)
    <method>.<argument>  -> the stage's method_args.<argument> when the stage's method is <method>
                            (dkd.beta, dist.gamma, fitnet.hint_weight, at.at_weight, ...)
    train.lr, train.label_smoothing, stage.drop_path -> the stage's own lr / label_smoothing / drop_path
A range is LOW:HIGH, with :log for a log scale (LOW > 0) and :int for integers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..utils.errors import ConfigError

STAGE_FIELDS = {"train.lr": "lr", "train.label_smoothing": "label_smoothing", "stage.drop_path": "drop_path",
                "stage.lr": "lr", "stage.label_smoothing": "label_smoothing"}
# --tune-each: each method's own knobs, declared here (the same budget for each)
DECLARED = {
    "kd": "kd.temperature=1:20:log,kd.alpha=0.05:0.95",
    "dkd": "dkd.beta=0.5:16:log,dkd.temperature=1:8:log",
    "dist": "dist.beta=0.25:4:log,dist.gamma=0.25:4:log",
    "fitnet": "fitnet.hint_weight=1:1000:log",
    "at": "at.at_weight=10:10000:log",
}
KNOB_WORDS = ("kd.temperature, kd.alpha, <method>.<argument> (e.g. dkd.beta), train.lr, train.label_smoothing "
              "or stage.drop_path")


@dataclass(frozen=True)
class Knob:
    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def text(self) -> str:
        return f"{self.name}={self.low:g}:{self.high:g}" + (":log" if self.log else "") + (":int" if self.integer else "")


def parse_knobs(spec) -> list:
    """'a=1:20:log,b=0.05:0.95' (or a {name: range} mapping) -> [Knob]; ConfigError on bad input."""
    items = list(spec.items()) if isinstance(spec, dict) else [
        tuple(part.split("=", 1)) if "=" in part else (part, "") for part in str(spec).split(",") if part.strip()]
    if not items:
        raise ConfigError("--tune: no knob given; e.g. --tune 'kd.temperature=1:20:log,kd.alpha=0.05:0.95'")
    knobs = []
    for name, rng in items:
        name, rng = str(name).strip(), str(rng).strip()
        if "test" in name.lower():
            raise ConfigError(f"--tune {name}: a search never reads the test split; tune on validation only")
        if name not in ("kd.temperature", "kd.alpha") and name not in STAGE_FIELDS and name.count(".") != 1:
            raise ConfigError(f"--tune: unknown knob {name!r}; a knob is one of {KNOB_WORDS}")
        parts = rng.split(":")
        flags = set(parts[2:])
        try:
            low, high = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            raise ConfigError(f"--tune {name}: range {rng!r} is not LOW:HIGH[:log][:int], e.g. {name}=1:20:log") from None
        if flags - {"log", "int"}:
            raise ConfigError(f"--tune {name}: unknown range flag(s) {sorted(flags - {'log', 'int'})}; use :log or :int")
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ConfigError(f"--tune {name}: low {low:g} is above high {high:g}")
        if "log" in flags and low <= 0:
            raise ConfigError(f"--tune {name}: a log range must lie above 0, got {low:g}:{high:g}")
        if name == "kd.alpha" and not (0 <= low and high <= 1):
            raise ConfigError(f"--tune kd.alpha: the KD weight lies in [0, 1], got {low:g}:{high:g}")
        knobs.append(Knob(name, low, high, "log" in flags, "int" in flags))
    if len({k.name for k in knobs}) != len(knobs):
        raise ConfigError("--tune: a knob is named twice")
    return knobs


def check_knobs_fit(stage, knobs: list) -> None:
    """Refuse a knob the stage cannot take: another method's argument, or KD knobs on a stage with no teacher."""
    method = stage.method or ("kd" if stage.teachers else "scratch")
    for k in knobs:
        head = k.name.split(".")[0]
        if k.name in ("kd.temperature", "kd.alpha") and not stage.teachers:
            raise ConfigError(f"--tune {k.name}: stage {stage.name!r} has no teacher to distil from")
        if k.name not in STAGE_FIELDS and head not in ("kd", method):
            raise ConfigError(f"--tune {k.name}: stage {stage.name!r} is taught by {method!r}, not {head!r}")


def with_values(stage, values: dict):
    """The stage with the knobs' values set (see the module's docstring for where each goes)."""
    args, fields = dict(stage.method_args), {}
    for name, v in values.items():
        if name == "kd.temperature":
            args["temperature"] = v
        elif name == "kd.alpha":
            args["kd_alpha"] = v
        elif name in STAGE_FIELDS:
            fields[STAGE_FIELDS[name]] = v
        else:
            args[name.split(".", 1)[1]] = v
    return replace(stage, method_args=args, **fields)


def declared_knobs(stage) -> list:
    """--tune-each: the knobs declared for the stage's method (DECLARED)."""
    method = stage.method or "kd"
    if method not in DECLARED:
        raise ConfigError(f"--tune-each: no knobs are declared for method {method!r} (have {', '.join(DECLARED)}); "
                          f"name them with --tune")
    return parse_knobs(DECLARED[method])
