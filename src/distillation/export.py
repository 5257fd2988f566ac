"""Each finished stage's weights for use outside this project: model.safetensors + model.json.

model.json holds what a plain timm user needs (model name, creation arguments, classes, image
size, normalisation) and says how to load it; see src/inference.py for the loading side.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save
from torch import nn

from ..data.sources import MEANS
from ..models.families import family_of
from ..models.factory import has_cifar_stem
from ..utils.checkpoint import _atomic_write, atomic_write_text
from ..runs.runfolder import StageFolder


def export_stage(cfg, stage, model: nn.Module, classes: list, stage_dir: Path) -> Path:
    """Write model.safetensors and model.json beside the stage's checkpoints."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(state, metadata={"model": stage.model, "num_classes": str(len(classes))})
    # through the atomic writer: a plain open(), so the file gets the user's umask (readable by the group
    # where the user's files are), not the owner-only mode of safetensors' own file writer
    _atomic_write(stage_dir / StageFolder.WEIGHTS, lambda f: f.write(blob))
    mean, std = MEANS[cfg.data.normalize]
    size = cfg.data.image_size
    create_kwargs = {"num_classes": len(classes), **stage.model_kwargs}
    if stage.patch_size:
        create_kwargs["patch_size"] = stage.patch_size
    family = family_of(stage.model)
    if family.img_size_arg:
        create_kwargs["img_size"] = size
    timm_ok = not family.hugging_face and not has_cifar_stem(model)
    info = {
        "model": stage.model, "stage": stage.name, "num_classes": len(classes), "classes": classes, "image_size": size,
        "mean": list(mean), "std": list(std), "weights": StageFolder.WEIGHTS, "create_kwargs": create_kwargs,
        "pretrained_cfg": {"num_classes": len(classes), "input_size": [3, size, size], "mean": list(mean),
                           "std": list(std)},
        "loads_with": ("timm.create_model(model, pretrained=True, **create_kwargs, pretrained_cfg_overlay=dict("
                       "file=<this folder>/model.safetensors, **pretrained_cfg))") if timm_ok else
                      ("src.load_model(RUN_DIR, stage) (" + ("a Hugging Face model" if family.hugging_face
                       else "CIFAR stem: 3x3 stride-1 conv1, no max-pool, which timm cannot build by name") + ")"),
    }
    atomic_write_text(stage_dir / StageFolder.MODEL_JSON, json.dumps(info, indent=2))
    return stage_dir / StageFolder.WEIGHTS
