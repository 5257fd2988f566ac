"""The trained student in hand: load_model, src.evaluate, the safetensors export, TensorBoard."""
import json
import sys

import pandas as pd
import pytest
import torch

import src
from src.distillation.chain import run_chain
from tests.conftest import run_cli, tiny_cfg, write_image

ONE = [{"name": "teacher", "model": "resnet10t", "role": "teacher"},
       {"name": "student", "model": "resnet10t", "role": "student", "teacher": "teacher"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    run_chain(tiny_cfg(train__epochs=1, stages=ONE), run, progress=False)
    return run


def test_load_model_gives_the_best_checkpoint_with_classes_and_normalisation(trained):
    m = src.load_model(trained, "student")
    assert m.classes == [str(i) for i in range(10)] and m.image_size == 16 and len(m.mean) == 3
    preds = pd.read_csv(trained / "student" / "test_predictions.csv")
    from src.data import load_dataset
    from src.spec.config import load_config
    data = load_dataset(load_config(trained / "config.yaml").data)
    with torch.no_grad():
        logits = m.model(m.preprocess(data.test.images))
    assert (logits.argmax(1).numpy() == preds["y_pred"].to_numpy()).all()
    saved = preds[[f"logit_{i}" for i in range(10)]].to_numpy()
    assert abs(logits.numpy() - saved).max() < 1e-3


def test_predictions_file_has_ids_labels_top5_and_logits(trained):
    preds = pd.read_csv(trained / "student" / "test_predictions.csv")
    assert list(preds.columns[:4]) == ["file", "y_true", "y_pred", "top5"]
    top5 = preds["top5"].str.split().map(lambda t: [int(v) for v in t])
    assert (top5.map(lambda t: t[0]) == preds["y_pred"]).all() and top5.map(len).eq(5).all()


def test_export_round_trips_through_plain_timm(trained):
    import timm
    info = json.loads((trained / "student" / "model.json").read_text())
    model = timm.create_model(info["model"], pretrained=True, **info["create_kwargs"],
                              pretrained_cfg_overlay=dict(file=str(trained / "student" / info["weights"]),
                                                          **info["pretrained_cfg"])).eval()
    ours = src.load_model(trained, "student").model
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), ours(x), atol=1e-6)
    assert info["classes"] == [str(i) for i in range(10)]


def test_cifar_stem_export_says_how_to_load_it(tmp_path):
    run = tmp_path / "run"
    run_chain(tiny_cfg(train__epochs=1, stages=[{"name": "teacher", "model": "resnet18", "cifar_stem": True}]), run,
              progress=False)
    info = json.loads((run / "teacher" / "model.json").read_text())
    assert "src.load_model" in info["loads_with"] and "CIFAR stem" in info["loads_with"]


def test_evaluate_cli_on_another_image_tree_matches_classes_by_name(trained, tmp_path, capsys):
    from src.evaluate import main
    tree = tmp_path / "tree"
    for c in ("3", "7"):  # a subset of the run's classes, in a different order of appearance
        for i in range(3):
            write_image(tree / "train" / c / f"{i}.png", size=(16, 16), seed=i)
            write_image(tree / "test" / c / f"{i}.png", size=(16, 16), seed=10 + i)
    out = tmp_path / "eval"
    assert main([str(trained), "--data-source", "imagefolder", "--data-root", str(tree), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    preds = pd.read_csv(out / "predictions.csv")
    assert metrics["images"] == 6 and set(preds["y_true"]) == {3, 7}
    assert preds["file"].str.startswith("test/").all()
    assert metrics["accuracy"] == pytest.approx((preds["y_true"] == preds["y_pred"]).mean())


def test_evaluate_cli_refuses_unknown_classes_and_stages(trained, tmp_path, capsys):
    from src.evaluate import main
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        write_image(tree / split / "zebra" / "0.png", size=(16, 16))
        write_image(tree / split / "zebra" / "1.png", size=(16, 16))
    assert main([str(trained), "--data-source", "imagefolder", "--data-root", str(tree)]) == 2
    assert "zebra" in capsys.readouterr().err
    assert main([str(trained), "--stage", "assistant"]) == 2
    assert "no stage 'assistant'" in capsys.readouterr().err


def test_tensorboard_logs_scalars_per_epoch_and_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import yaml
    from src.spec.config import to_dict
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(tiny_cfg(train__epochs=2, stages=ONE))))
    code, err = run_cli("cnn", "--config", cfg, "--output-dir", tmp_path / "run", "--tensorboard")
    assert code == 0, err
    acc = EventAccumulator(str(tmp_path / "run" / "tb" / "student")).Reload()
    tags = acc.Tags()["scalars"]
    assert {"epoch/val_accuracy", "epoch/train_ce", "epoch/train_kd", "step/learning_rate", "step/alpha",
            "step/train_loss"} <= set(tags)
    assert [e.step for e in acc.Scalars("epoch/val_accuracy")] == [1, 2]
    steps = [e.step for e in acc.Scalars("step/learning_rate")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 2
    figs = EventAccumulator(str(tmp_path / "run" / "tb")).Reload().Tags()["images"]
    assert any("curves" in t for t in figs)


def test_resume_with_tensorboard_fills_in_the_epochs_already_logged(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import pandas as pd
    import yaml
    from src.spec.config import to_dict
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(tiny_cfg(train__epochs=2, stages=ONE))))
    code, err = run_cli("cnn", "--config", cfg, "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert not (tmp_path / "run" / "tb").exists()
    code, err = run_cli("cnn", "--resume", tmp_path / "run", "--tensorboard")
    assert code == 0, err
    acc = EventAccumulator(str(tmp_path / "run" / "tb" / "student")).Reload()
    assert [e.step for e in acc.Scalars("epoch/val_accuracy")] == [1, 2]
    logged = pd.read_csv(tmp_path / "run" / "student" / "schedule.csv")
    losses = acc.Scalars("step/train_loss")
    assert [e.step for e in losses] == logged["step"].tolist()
    assert [e.value for e in losses] == pytest.approx(logged["loss"].tolist(), rel=1e-6)


def test_missing_tensorboard_is_a_one_line_error(tmp_path, monkeypatch):
    import yaml
    from src.spec.config import to_dict
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(tiny_cfg(train__epochs=1, stages=ONE))))
    code, err = run_cli("cnn", "--config", cfg, "--output-dir", tmp_path / "run", "--tensorboard")
    assert code == 2 and err.strip().count("\n") == 0
    assert "python -m pip install tensorboard" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
