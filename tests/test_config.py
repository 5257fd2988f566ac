import pytest

from src.spec.config import apply_override, from_dict, load_config
from src.utils.errors import ConfigError
from tests.conftest import ROOT

BASE = {"stages": [{"name": "t", "model": "resnet18"}]}


def _cfg(**sections):
    raw = {"stages": [{"name": "t", "model": "resnet18"}, {"name": "s", "model": "resnet18", "teacher": "t"}]}
    raw.update(sections)
    return raw


def test_every_preset_parses():
    presets = sorted(ROOT.glob("*_distillation/configs/*.yaml"))
    assert len(presets) == 13
    for p in presets:
        cfg = load_config(p)
        assert cfg.stages


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key \['epoch'\] in 'train'; valid keys: epochs, batch_size"):
        from_dict(_cfg(train={"epoch": 3}))


@pytest.mark.parametrize("section,value,match", [
    ("train", {"epochs": -1}, "train.epochs must be >= 1"),
    ("train", {"epochs": "ten"}, "expected an integer"),
    ("train", {"lr": 0}, "train.lr must be > 0"),
    ("kd", {"alpha_start": 1.5}, r"kd.alpha_start must be in \[0, 1\]"),
    ("kd", {"alpha_end": -0.1}, r"kd.alpha_end must be in \[0, 1\]"),
    ("kd", {"temperature": 0}, "kd.temperature must be > 0"),
    ("data", {"source": "imagenet"}, "data.source"),
    ("data", {"val_fraction": 1.5}, "val_fraction"),
    ("train", {"amp": "yes"}, "expected true/false"),
    ("train", {"optimizer": "lamb"}, "train.optimizer"),
    ("train", {"momentum": 1.0}, r"train.momentum must be in \[0, 1\)"),
])
def test_bad_values_are_refused_with_the_key(section, value, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(_cfg(**{section: value}))


def test_stage_teacher_must_be_an_earlier_stage():
    raw = {"stages": [{"name": "s", "model": "resnet18", "teacher": "t"}, {"name": "t", "model": "resnet50"}]}
    with pytest.raises(ConfigError, match="must name an earlier stage"):
        from_dict(raw)


def test_overrides_reach_sections_and_named_stages():
    raw = _cfg()
    apply_override(raw, "train.epochs=7")
    apply_override(raw, "stages.s.epochs=3")
    apply_override(raw, "kd.temperature=2")
    cfg = from_dict(raw)
    assert cfg.train.epochs == 7 and cfg.stage("s").epochs == 3 and cfg.kd.temperature == 2.0
    with pytest.raises(ConfigError, match="no stage named"):
        apply_override(_cfg(), "stages.nope.epochs=3")


def test_yaml_is_read_with_safe_load(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo hacked']\nstages: [{name: t, model: resnet18}]\n")
    with pytest.raises(ConfigError, match=r"the tag !!python/object/apply:os.system is refused"):
        load_config(p)
