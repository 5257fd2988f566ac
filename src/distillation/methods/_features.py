"""Shared by the feature methods: which stage outputs of student and teacher are paired."""
from __future__ import annotations

from torch import nn

from . import bare_module, feature_shapes, stage_outputs
from ...models.factory import is_cnn
from ...utils.errors import ConfigError


def paired_stages(method: str, student: nn.Module, teacher: nn.Module, image_size: int) -> list:
    """[(student module, teacher module, student [C, H, W], teacher [C, H, W])]: the stage outputs
    (the last module of each feature-map size) of student and teacher that share a spatial size,
    in forward order."""
    cnn = [is_cnn(bare_module(m)) for m in (student, teacher)]  # a ViT's one 4-D map is its patch embedding
    s_names = stage_outputs(student, image_size) if cnn[0] else []
    t_names = stage_outputs(teacher, image_size) if cnn[1] else []
    if not s_names or not t_names:
        raise ConfigError(f"method {method!r} needs feature maps (a CNN); "
                          f"{'the student' if not s_names else 'the teacher'} has none")
    s_shapes = feature_shapes(student, s_names, image_size)
    t_shapes = dict(zip(t_names, feature_shapes(teacher, t_names, image_size)))
    pairs = []
    for s_name, s_shape in zip(s_names, s_shapes):
        match = [t for t, shape in t_shapes.items() if shape[1:] == s_shape[1:]]
        if match:
            pairs.append((s_name, match[-1], s_shape, t_shapes[match[-1]]))
    if not pairs:
        raise ConfigError(f"method {method!r}: no stage of the student ({', '.join(s_names)}) has a feature-map "
                          f"size of the teacher's ({', '.join(t_names)}); name the layers with "
                          f"method_args: {{student_layer: ..., teacher_layer: ...}}")
    return pairs


def pick(method: str, pairs: list, student_layer, teacher_layer, student, teacher, image_size: int) -> tuple:
    """The pair a method uses: the named layers, or the middle paired stage (FitNets' hint layer)."""
    if student_layer or teacher_layer:
        if not (student_layer and teacher_layer):
            raise ConfigError(f"method {method!r}: give both student_layer and teacher_layer, or neither")
        for name, model, role in ((student_layer, student, "student"), (teacher_layer, teacher, "teacher")):
            if name not in dict(model.named_modules()):
                raise ConfigError(f"method {method!r}: the {role} has no module {name!r} "
                                  f"(its stage outputs: {', '.join(stage_outputs(model, image_size))})")
        s_shape = feature_shapes(student, [student_layer], image_size)[0]
        t_shape = feature_shapes(teacher, [teacher_layer], image_size)[0]
        return student_layer, teacher_layer, s_shape, t_shape
    return pairs[len(pairs) // 2]
