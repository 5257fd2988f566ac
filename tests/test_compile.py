"""torch.compile in the training path: compiled before the first epoch, never again during one."""
import functools
import json

import pytest
import torch

from src.data import build_loaders, load_dataset
from src.distillation import stage as stage_module
from src.distillation.chain import run_chain
from tests.conftest import tiny_cfg


def test_every_batch_of_every_split_has_the_layout_the_model_is_compiled_for():
    """The crop's gather leaves NHWC strides; a compiled model is specialised to its input's strides,
    so train batches of another layout than the warm-up's (and the evaluation batches') recompiled it."""
    cfg = tiny_cfg(data__random_erasing=0.5)
    data = load_dataset(cfg.data)
    for channels_last, fmt in ((False, torch.contiguous_format), (True, torch.channels_last)):
        loaders = build_loaders(data, 32, torch.device("cpu"), cfg.data, channels_last, seed=0)
        for split, loader in loaders.items():
            x, _ = next(iter(loader))
            assert x.is_contiguous(memory_format=fmt), (split, channels_last, x.stride())


VIT = {"model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}, "patch_size": 4}


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_a_compiled_chain_compiles_before_its_epochs_and_never_during_them(tmp_path, monkeypatch, kind):
    """Both stages (the student with its compiled frozen teacher) compile in the warm-up, timed apart;
    no frame is compiled or recompiled while an epoch is timed, also on the ViT preset's path (mixup,
    cutmix, random erasing, a checkpointed teacher stage as ViT-Base trains, attention maps drawn
    from the model between epochs). Dynamo's guards
    (strides, grad mode, hooks) decide recompilation whatever the backend, so the test uses
    aot_eager: no C++ compiler needed."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    compiled_in_epochs = []
    real_epoch = stage_module.train_one_epoch

    def counting_epoch(*args, **kwargs):
        before = counters["frames"]["total"]
        out = real_epoch(*args, **kwargs)
        compiled_in_epochs.append(counters["frames"]["total"] - before)
        return out
    monkeypatch.setattr(stage_module, "train_one_epoch", counting_epoch)
    cfg = tiny_cfg(train__epochs=2, train__compile="true")
    if kind == "vit":
        cfg = tiny_cfg(train__epochs=2, train__compile="true", data__mixup=0.8, data__cutmix=1.0,
                       data__random_erasing=0.25, viz={"attention_every": 1, "attention_images": 2},
                       stages=[{"name": "teacher", "model": "vit_tiny_patch16_224", "role": "teacher",
                                 "grad_checkpointing": True, **VIT},
                               {"name": "student", "model": "vit_tiny_patch16_224", "role": "student",
                                "teacher": "teacher", **VIT}])
    try:
        run_chain(cfg, tmp_path / "run", progress=False)
    finally:
        torch._dynamo.reset()  # no compiled graphs left behind for the tests that follow
    assert compiled_in_epochs == [0, 0, 0, 0]  # two stages x two epochs
    if kind == "vit":
        assert len(list((tmp_path / "run" / "student" / "attention").glob("*.png"))) == 2
    for stage in ("teacher", "student"):
        info = json.loads((tmp_path / "run" / stage / "stage.json").read_text())
        assert info["compile"] is True and info["compile_seconds"] > 0
        assert info["grad_checkpointing"] is (kind == "vit" and stage == "teacher")
