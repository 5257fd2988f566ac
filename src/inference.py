"""The trained models in hand: load a stage of a run folder, or export it for use elsewhere.

    import src
    m = src.load_model("runs/cnn/cnn_cifar10-...", stage="student")
    m.model(images_normalised)            # logits [B, C]; m.classes, m.mean, m.std, m.image_size
    m.preprocess(uint8_images)            # uint8 [B, 3, H, W] -> the normalised input the model expects

Every finished stage also holds `model.safetensors` and `model.json`: the weights and what a
plain timm user needs (model name, creation arguments, classes, image size, normalisation):

    cfg = json.load(open("student/model.json"))
    model = timm.create_model(cfg["model"], pretrained=True, **cfg["create_kwargs"],
                              pretrained_cfg_overlay=dict(file="student/model.safetensors", **cfg["pretrained_cfg"]))
(a ResNet with the CIFAR stem, a model timm cannot build by name, needs src.load_model instead,
as model.json says.)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from .data.loaders import Normalizer
from .data.sources import MEANS
from .spec.config import load_config
from .spec.names import BASELINES
from .distillation.stage import build_stage_model, load_weights
from .utils.errors import CheckpointError
from .runs.runfolder import RunFolder, StageFolder


@dataclass
class LoadedModel:
    model: nn.Module
    classes: list
    image_size: int
    mean: tuple
    std: tuple
    stage: str
    model_name: str
    finished: bool = True          # False: the stage's training was interrupted (best.pt is part-way)

    # used as the module it holds: loaded(x), loaded.eval(), loaded.to("cuda") (the network is `.model`)
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of preprocessed images x [B, 3, S, S] (see preprocess)."""
        return self.model(x)

    def eval(self) -> "LoadedModel":
        self.model.eval()
        return self

    def to(self, *args, **kwargs) -> "LoadedModel":
        self.model.to(*args, **kwargs)
        return self

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float [B, 3, S, S], resized and normalised as in training."""
        x = images_uint8.float().div(255)
        return Normalizer((self.mean, self.std), x.device, self.image_size, False)(x)


def final_student(cfg) -> str:
    """The stage a run is about when none is named: `student` where the chain has one, else (a
    sweep: student_via_<path> per path) the last path's student (not a baseline, a --methods variant or a
    search's _tuned stage), else the last student, else the last stage. load_model and src.evaluate both use it."""
    names = [s.name for s in cfg.stages]
    if "student" in names:
        return "student"
    students = [s for s in cfg.stages if (s.role == "student" or s.name.startswith("student")) and s.name not in BASELINES]
    paths = [s.name for s in students if not s.method and not s.name.endswith("_tuned")]  # not --methods' or a search's
    return (paths or [s.name for s in students] or names)[-1]


def load_model(run_dir, stage: Optional[str] = None, device="cpu", checkpoint: str = StageFolder.BEST) -> LoadedModel:
    """The stage's model of a finished (or interrupted) run, with its best-validation weights, in
    eval mode; `stage` defaults to the chain's final student (final_student). `finished` says
    whether the stage completed its training (an interrupted one's best.pt is part-way)."""
    folder = RunFolder(run_dir)
    top = folder.path
    if folder.is_multi_seed:
        folder = folder.first_seed()  # a --seeds run: the first seed, as the report's figures
    run_dir = folder.path
    if not folder.config_path.exists():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(folder.config_path)
    stage = stage or final_student(cfg)
    try:
        st = cfg.stage(stage)
    except KeyError:
        raise CheckpointError(f"{run_dir}: no stage {stage!r}; its stages: {', '.join(s.name for s in cfg.stages)}") \
            from None
    classes = folder.classes()
    weights = folder.stage(stage).file(checkpoint)
    if not weights.exists():
        raise CheckpointError(f"stage {stage!r} of {run_dir} has no trained weights yet ({checkpoint} missing: it has "
                              f"not finished an epoch); continue the run with --resume {top}")
    model = build_stage_model(cfg, replace(st, pretrained=False, pretrained_file=None, checkpoint=None), len(classes))
    load_weights(model, weights, f"{weights}")
    mean, std = MEANS[cfg.data.normalize]
    return LoadedModel(model=model.to(device).eval(), classes=classes, image_size=cfg.data.image_size, mean=mean,
                       std=std, stage=stage, model_name=st.model, finished=folder.stage(stage).finished)
