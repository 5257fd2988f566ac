"""The stages a study adds, named in one place: the baselines beside a chain, an assistant per path
step, a student per path and per method. Every expansion (--baselines, --assistants, --methods,
the TAKD reproduction's tables) builds and names its stages here, and the readers (the report,
load_model's default student) recognise them by these names."""
from __future__ import annotations

from dataclasses import replace

SCRATCH = "student_scratch"   # the student trained alone
DIRECT_KD = "student_kd"      # the student distilled from the teacher directly
BASELINES = (SCRATCH, DIRECT_KD)


def assistant_stage(key: str) -> str:
    """An assistant's stage: ta_<model or path key> (ta_resnet34, ta_resnet34_resnet26)."""
    return f"ta_{key}"


def path_student(key: str) -> str:
    """The student at the end of a sweep's path: student_via_<path key>."""
    return f"student_via_{key}"


def method_student(method: str, via=None) -> str:
    """A method's student: student_<m> from the teacher, student_<m>_via_<assistant or path key>."""
    return f"student_{method}" if via is None else f"student_{method}_via_{via}"


def tuned_stage(name: str) -> str:
    """The stage a search adds beside a tuned one, with the search's best values: <stage>_tuned."""
    return f"{name}_tuned"


def baseline_stages(student, teacher_name: str) -> dict:
    """{name: stage} of the two baselines made from the chain's student: trained alone, and
    distilled from `teacher_name` directly. Same model, data, epochs, recipe and seed stream as
    the student, no checkpoint and no method of its own."""
    shared = dict(checkpoint=None, role=student.role or "student", seed_stream=student.seed_stream or student.name,
                  method=None, method_args={})
    return {SCRATCH: replace(student, name=SCRATCH, teacher=None, **shared),
            DIRECT_KD: replace(student, name=DIRECT_KD, teacher=teacher_name, **shared)}
