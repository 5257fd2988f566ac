"""ViT-specific pieces: attention maps (timm and transformers), cross-architecture chains."""
import json

import pytest
import timm
import torch

from src.distillation.chain import run_chain
from src.models import create_model
from src.visualization.vit_viz import attention_rollout, attention_weights, save_attention_maps
from tests.conftest import ROOT, run_cli, tiny_cfg


def _all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", ["timm", "hf"])
def test_attention_maps_written_without_gradients_or_leftover_hooks(tmp_path, kind):
    if kind == "timm":
        model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                                  num_heads=2, num_classes=3)
    else:
        model = create_model("hf:vit", 3, image_size=16, patch_size=4,
                             model_kwargs=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64))
    model.train()
    x = torch.randn(10, 3, 16, 16)
    raw = (torch.rand(10, 3, 16, 16) * 255).to(torch.uint8)
    hooks_before = _all_hooks(model)
    path = save_attention_maps(model, x, raw, tmp_path / "att.png", heads=2, rollout=True)
    assert path.stat().st_size > 1000
    assert all(p.grad is None for p in model.parameters())
    if kind == "timm":
        assert _all_hooks(model) == hooks_before
    else:  # transformers installs its own output-recording hooks once, on first use; none may pile up
        after_first = _all_hooks(model)
        save_attention_maps(model, x, raw, tmp_path / "att2.png", heads=1)
        assert _all_hooks(model) == after_first
    assert model.training  # mode restored
    assert torch.is_grad_enabled()


def test_recomputed_timm_attention_equals_the_unfused_computation():
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1,
                              num_heads=2, num_classes=3).eval()
    x = torch.randn(3, 3, 16, 16)
    ours = attention_weights(model, x)[0]
    captured = {}
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    h = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("w", o))
    with torch.no_grad():
        model(x)
    h.remove()
    assert ours.shape == (3, 2, 17, 17)
    assert torch.allclose(ours, captured["w"], atol=1e-6)
    assert torch.allclose(ours.sum(-1), torch.ones(3, 2, 17))


def test_rollout_rows_are_distributions():
    layers = [torch.softmax(torch.randn(2, 3, 5, 5), -1) for _ in range(3)]
    r = attention_rollout(layers)
    assert r.shape == (2, 5, 5) and torch.allclose(r.sum(-1), torch.ones(2, 5))


def test_hf_vit_chain_through_the_same_engine(tmp_path):
    hf = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    cfg = tiny_cfg(stages=[
        {"name": "teacher", "model": "resnet10t", "role": "teacher"},
        {"name": "student", "model": "hf:vit", "role": "student", "teacher": "teacher", "patch_size": 4,
         "grad_checkpointing": True, "model_kwargs": hf}], viz={"attention_every": 1, "attention_images": 2})
    df = run_chain(cfg, tmp_path / "run", progress=False)
    assert list(df["model"]) == ["resnet10t", "hf:vit"]
    assert list((tmp_path / "run" / "student" / "attention").glob("*.png"))
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["student"]["grad_checkpointing"] is True


def test_a_cut_attention_map_neither_stops_the_report_nor_is_left_by_a_failed_write(tmp_path, monkeypatch):
    """A kill during the old non-atomic savefig left an empty epoch_003.png that a resumed run never
    draws again, and the report then failed on it (seen in the chaos test). The map is now written
    through a temporary file, and the report's gallery passes over a map it cannot read."""
    import matplotlib.figure

    from src.analysis.report import write_report
    from src.runs.runfolder import RunFolder
    vit = {"model": "vit_tiny_patch16_224", "patch_size": 8, "model_kwargs": {"embed_dim": 16, "depth": 1, "num_heads": 2}}
    cfg = tiny_cfg(stages=[{"name": "student", **vit}], viz={"attention_every": 1, "attention_images": 2})
    run_chain(cfg, tmp_path / "run", progress=False)
    maps = sorted(RunFolder(tmp_path / "run").stage("student").attention.glob("epoch_*.png"))
    assert [m.name for m in maps] == ["epoch_001.png", "epoch_002.png"]
    whole = maps[-1].read_bytes()

    def cut_write(fig, fname, **kw):  # a write that stops part-way, as a kill or a full disk would
        fname.write(b"\x89PNG\r\n")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", cut_write)
    model = create_model("vit_tiny_patch16_224", 10, image_size=16, patch_size=8, model_kwargs=vit["model_kwargs"])
    with pytest.raises(Exception, match="No space left"):
        save_attention_maps(model, torch.randn(2, 3, 16, 16), torch.zeros(2, 3, 16, 16, dtype=torch.uint8), maps[-1])
    monkeypatch.undo()
    assert maps[-1].read_bytes() == whole and not list(maps[-1].parent.glob("*.tmp"))  # the old map is kept whole

    maps[-1].write_bytes(b"")  # what the old code could leave behind
    assert write_report([tmp_path / "run"]).exists()
    assert list((tmp_path / "run" / "figures").glob("*attention_gallery.png"))  # from epoch_001.png


@pytest.mark.slow
def test_cross_architecture_preset_runs(tmp_path):
    code, err = run_cli("vit", "--config", ROOT / "vit_distillation/configs/cnn_teacher.yaml", "--output-dir",
                        tmp_path / "run", "--data-source", "digits", "--epochs", 1, "--batch-size", 50,
                        "--set", "data.max_train_samples=100", "--set", "data.max_test_samples=50",
                        "--set", "data.image_size=16")
    assert code == 0, err[-2000:]
    summary = (tmp_path / "run" / "summary.csv").read_text()
    assert "resnet50" in summary and "vit_small_patch16_224" in summary and "vit_tiny_patch16_224" in summary


def test_clean_script_is_shared_and_harmless_without_gpu(tmp_path, capsys, monkeypatch):
    import io
    import subprocess

    from src.runs.clean import main as clean_main
    for chain in ("cnn", "vit"):
        text = (ROOT / f"{chain}_distillation" / "clean.sh").read_text()
        assert "python}\" -m src.runs.clean" in text  # one implementation, two thin scripts
    runs = tmp_path / "runs"

    def run_folder(path, *markers):
        path.mkdir(parents=True)
        for m in markers:
            (path / m).write_text("{}")
        return path
    run_folder(runs / "cnn" / "old", "config.yaml", "env.json")
    run_folder(runs / "demo" / "older", "seeds.json")
    keep = runs / "notes.txt"
    keep.write_text("mine")
    elsewhere = run_folder(tmp_path / "elsewhere" / "run1", "config.yaml", "env.json")
    clean_in_process = ["--runs", str(runs)]  # the script's main(), in this process
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal
    assert clean_main(clean_in_process + ["--remove-all"]) == 2 and (runs / "cnn" / "old").exists()
    assert "pass --yes" in capsys.readouterr().err  # no confirmation, nothing deleted
    assert clean_main(clean_in_process + ["--remove", str(elsewhere), "--yes"]) == 0
    assert not elsewhere.exists() and (runs / "cnn" / "old").exists()  # only that one
    assert clean_main(clean_in_process + ["--remove", str(elsewhere)]) == 2 and "not found" in capsys.readouterr().err
    assert clean_main(clean_in_process + ["--remove-all", "--yes"]) == 0
    assert not (runs / "cnn" / "old").exists() and not (runs / "demo" / "older").exists()
    assert keep.read_text() == "mine"  # not a run folder: untouched
    if not torch.cuda.is_available():
        assert "No CUDA device visible" in capsys.readouterr().out
    clean = ["bash", str(ROOT / "cnn_distillation/clean.sh")]  # the script itself: --help answers before torch loads
    help_text = subprocess.run(clean + ["--help"], capture_output=True, text=True).stdout
    assert "cannot free" in help_text and "spec fix" not in help_text
