import tarfile

import pytest
import torch

from src.data.loaders import TensorLoader, apply_erasing, erasing_draws, random_crop_flip
from src.data.sources import Split, load_dataset
from src.spec.config import DataConfig
from src.models import count_params, create_model
from src.models.factory import check_state_dict
from src.utils.checkpoint import atomic_save, safe_load
from src.utils.errors import CheckpointError, ConfigError, DataError
from tests.conftest import write_image


class PickledThing:
    """Stands for any arbitrary object in a checkpoint (its unpickling could run code)."""


def test_digits_splits_are_fixed_stratified_and_disjoint():
    d = DataConfig(source="digits", image_size=16, val_fraction=0.1)
    a, b = load_dataset(d), load_dataset(d)
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.train.images, b.train.images)
    assert a.train.images.shape[1:] == (3, 16, 16) and a.train.images.dtype == torch.uint8
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert set(a.val.labels.tolist()) == set(range(10))
    ta = {tuple(x.flatten().tolist()) for x in a.test.images[:50]}
    assert not ta & {tuple(x.flatten().tolist()) for x in a.val.images}


def test_image_folder_with_mixed_sizes_and_modes(image_tree):
    write_image(image_tree / "train" / "cat" / "grey.png", mode="L", size=(20, 14))
    write_image(image_tree / "train" / "cat" / "rgba.png", mode="RGBA", size=(9, 9))
    write_image(image_tree / "train" / "dog" / "cmyk.jpg", mode="CMYK", size=(30, 12))
    write_image(image_tree / "train" / "dog" / "pal.gif", mode="P", size=(12, 12))
    data = load_dataset(DataConfig(source="imagefolder", root=str(image_tree), image_size=32, val_fraction=0.2,
                                   cache_dir=str(image_tree.parent / "cache")))
    assert data.classes == ["cat", "dog"]
    assert data.store_size == 12  # first image's native size; the device resizes to 32
    assert len(data.train) + len(data.val) == 24 and len(data.test) == 6
    assert data.train.images.shape[1:] == (3, 12, 12)
    again = load_dataset(DataConfig(source="imagefolder", root=str(image_tree), image_size=32, val_fraction=0.2,
                                    cache_dir=str(image_tree.parent / "cache")))
    assert torch.equal(again.train.images, data.train.images)  # from the decode cache
    assert list((image_tree.parent / "cache").glob("decoded-*.pt"))


def test_the_test_split_is_decoded_once_whatever_the_train_subset(image_tree, monkeypatch):
    """Another data.max_train_samples decodes the train images it needs and reuses the test split."""
    import src.data.sources as sources
    decoded = []
    real = sources.decode_images
    monkeypatch.setattr(sources, "decode_images", lambda files, *a, **k: decoded.append(len(files)) or real(files, *a, **k))
    kw = dict(source="imagefolder", root=str(image_tree), image_size=12, cache_dir=str(image_tree.parent / "cache"))
    first = load_dataset(DataConfig(**kw))
    assert decoded == [20, 6]
    second = load_dataset(DataConfig(max_train_samples=10, **kw))
    assert decoded == [20, 6, 10]  # the 6 test images came from the cache
    assert torch.equal(first.test.images, second.test.images) and len(second.train) + len(second.val) == 10


def test_image_folder_from_a_tarball(image_tree, tmp_path, monkeypatch):
    import src.data.sources as sources
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_tree, arcname="mydata")
    monkeypatch.setattr(sources, "EXTRACT_DIR", tmp_path / "extracted")
    data = load_dataset(DataConfig(source="imagefolder", root=str(archive), image_size=12,
                                   cache_dir=str(tmp_path / "cache")))
    assert data.num_classes == 2 and len(data.test) == 6


@pytest.mark.parametrize("case,match", [
    ("missing", "dataset folder not found"),
    ("empty_class", "has no images"),
    ("no_classes", "has no class folders"),
    ("no_test", "neither test/ nor val/"),
    ("corrupt", "cannot read image .*broken.png"),
])
def test_bad_image_folders_are_named(image_tree, case, match):
    import shutil
    root = image_tree
    if case == "missing":
        root = image_tree / "nope"
    elif case == "empty_class":
        (image_tree / "train" / "bird").mkdir()
        (image_tree / "test" / "bird").mkdir()
    elif case == "no_classes":
        shutil.rmtree(image_tree / "train")
        (image_tree / "train").mkdir()
    elif case == "no_test":
        shutil.rmtree(image_tree / "test")
    elif case == "corrupt":
        (image_tree / "train" / "cat" / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(source="imagefolder", root=str(root), image_size=12, cache_dir=str(image_tree.parent / "c")))


def test_corrupt_images_can_be_skipped_and_are_counted(image_tree):
    (image_tree / "train" / "cat" / "broken.png").write_bytes(b"garbage")
    data = load_dataset(DataConfig(source="imagefolder", root=str(image_tree), image_size=12, skip_bad_images=True,
                                   cache_dir=str(image_tree.parent / "c")))
    assert len(data.skipped_files) == 1 and data.skipped_files[0].endswith("broken.png")
    assert len(data.train) + len(data.val) == 20


def test_offline_cifar_download_failure_names_the_alternatives(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def no_network(self, *a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(tvd.CIFAR10, "download", no_network)
    with pytest.raises(DataError, match="imagefolder.*digits"):
        load_dataset(DataConfig(source="cifar10", root=str(tmp_path)))


def test_crop_flip_geometry():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop_flip(x, 0, False, g), x)
    out = random_crop_flip(x, 2, True, g)
    assert out.shape == x.shape
    for b in range(2):  # every output is a (possibly flipped) window of the reflect-padded image
        padded = torch.nn.functional.pad(x[b:b + 1], (2, 2, 2, 2), mode="reflect")[0]
        windows = [padded[:, i:i + 4, j:j + 4] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) or torch.equal(out[b], w.flip(2)) for w in windows)


def _box_stats(boxes: torch.Tensor, size: int) -> dict:
    """boxes: [4, N] (top, left, height, width), height 0 = not erased."""
    erased = boxes[2] > 0
    h, w = boxes[2][erased].double(), boxes[3][erased].double()
    return {"rate": erased.double().mean().item(), "area": (h * w / size ** 2).mean().item(),
            "log_aspect_sd": (h / w).log().std().item()}


def test_batched_random_erasing_draws_the_boxes_timm_draws():
    """Same distribution as timm's RandomErasing(mode='pixel'), measured on 6,000 images: erased
    share, mean box area and aspect spread; boxes lie inside the image; the noise fills exactly
    the box and leaves every other pixel as it was."""
    import random
    from timm.data.random_erasing import RandomErasing
    n, size, p = 6000, 32, 0.25
    random.seed(0)
    ref = torch.zeros(n, 1, size, size)
    RandomErasing(probability=p, mode="pixel", device="cpu")(ref)
    nz = ref[:, 0] != 0
    rows, cols = nz.any(2), nz.any(1)  # [N, H], [N, W]: the erased box's rows and columns
    timm_boxes = torch.stack([rows.long().argmax(1), cols.long().argmax(1), rows.sum(1), cols.sum(1)])
    ours = erasing_draws(n, size, size, p, torch.Generator().manual_seed(0), torch.device("cpu"))
    a, b = _box_stats(timm_boxes, size), _box_stats(ours, size)
    assert abs(a["rate"] - p) < 0.02 and abs(b["rate"] - p) < 0.02, (a, b)  # 3.5 standard errors
    assert abs(a["area"] - b["area"]) < 0.015, (a, b)                        # about 4 standard errors
    assert abs(a["log_aspect_sd"] - b["log_aspect_sd"]) < 0.06, (a, b)
    e = ours[2] > 0
    assert (ours[0][e] >= 0).all() and (ours[0][e] + ours[2][e] <= size).all()
    assert (ours[1][e] >= 0).all() and (ours[1][e] + ours[3][e] <= size).all()
    x = torch.full((64, 3, size, size), 7.0)
    out = apply_erasing(x, ours[:, :64])
    for i in range(64):
        t, l, h, w = ours[:, i].tolist()
        inside = torch.zeros(size, size, dtype=torch.bool)
        inside[t:t + h, l:l + w] = True
        assert (out[i][:, ~inside] == 7.0).all() and (out[i][:, inside] != 7.0).all()
    noise = out[out != 7.0]
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1


def test_random_erasing_costs_the_same_kernels_whatever_the_batch_size():
    """timm's RandomErasing loops over the batch on the host, two kernels per erased image; the
    loader's erasing is a fixed number of operations per batch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))
    counts = []
    for batch in (16, 256):
        boxes = erasing_draws(batch, 32, 32, 0.5, torch.Generator().manual_seed(1), torch.device("cpu"))
        with Ops() as ops:
            apply_erasing(torch.randn(batch, 3, 32, 32), boxes)
        counts.append(ops.count)
    assert counts[0] == counts[1] < 30, counts


def test_tensor_loader_epochs_are_reproducible_and_cover_the_split():
    data = load_dataset(DataConfig(source="digits", image_size=8))
    d = DataConfig(source="digits", image_size=8)
    loader = TensorLoader(data.train, 100, torch.device("cpu"), True, d, seed=3)
    loader.set_epoch(2)
    first = [y.clone() for _, y in loader]
    loader.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in loader]))
    assert sum(len(y) for y in first) == len(loader) * 100
    ev = TensorLoader(data.val, 64, torch.device("cpu"), False, d)
    assert torch.equal(torch.cat([y for _, y in ev]), data.val.labels)


def test_cifar_stem_keeps_32px_resolution():
    m = create_model("resnet18", 10, cifar_stem=True)
    assert m.conv1.stride == (1, 1) and isinstance(m.maxpool, torch.nn.Identity)
    feats = m.forward_features(torch.randn(1, 3, 32, 32))
    assert feats.shape[-1] == 4  # 32 / 8 (three stride-2 stages), not 1
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vit_patch_and_image_size_override():
    m = create_model("vit_tiny_patch16_224", 10, image_size=32, patch_size=4)
    assert m.patch_embed.grid_size == (8, 8)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_unknown_model_and_offline_weights_are_clear_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown timm model"):
        create_model("resnet_does_not_exist", 10)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="pretrained_file"):
        create_model("resnet18", 10, pretrained=True)


def test_local_pretrained_file(tmp_path):
    src = create_model("resnet18", 1000)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    m = create_model("resnet18", 10, pretrained_file=str(path))
    assert torch.equal(m.conv1.weight, src.conv1.weight)  # backbone loaded, head re-initialised for 10 classes


def test_checkpoint_mismatch_names_class_count_or_architecture():
    m10 = create_model("resnet10t", 10)
    with pytest.raises(CheckpointError, match="class count"):
        check_state_dict(m10, create_model("resnet10t", 100).state_dict(), "ckpt")
    with pytest.raises(CheckpointError, match="architecture does not match"):
        check_state_dict(m10, create_model("resnet18", 10).state_dict(), "ckpt")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": PickledThing()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        safe_load(path)
    with pytest.raises(CheckpointError, match="not found"):
        safe_load(tmp_path / "missing.pt")


def test_atomic_save_keeps_previous_file_when_writing_fails(tmp_path, monkeypatch):
    from src.utils.checkpoint import SaveError
    path = tmp_path / "last.pt"
    atomic_save({"epoch": torch.tensor(1)}, path)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SaveError, match="No space left on device.*previous version is kept"):
        atomic_save({"epoch": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert int(safe_load(path)["epoch"]) == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_param_count():
    assert count_params(torch.nn.Linear(3, 2)) == 8


def test_streamed_image_tree_trains_through_the_dataloader_path(image_tree, tmp_path):
    from src.distillation.chain import run_chain
    from tests.conftest import tiny_cfg
    cfg = tiny_cfg(data={"source": "imagefolder", "root": str(image_tree), "image_size": 16, "loader": "dataloader",
                         "num_workers": 0, "val_fraction": 0.25},
                   stages=[{"name": "teacher", "model": "vit_tiny_patch16_224", "patch_size": 8,
                            "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}}],
                   train__epochs=1, viz={"attention_every": 1, "attention_images": 2})
    df = run_chain(cfg, tmp_path / "run", progress=False)
    assert len(df) == 1 and not (image_tree / ".cache").exists()  # nothing decoded into a tensor cache
    assert list((tmp_path / "run" / "teacher" / "attention").glob("*.png"))


def test_streamed_batches_are_erased_like_in_memory_ones(image_tree):
    """The DataLoader path applies data.random_erasing too (it once skipped it silently): with the
    same order and no other augmentation, each image differs from its unerased twin in one box."""
    from src.data.loaders import StreamLoader
    data = load_dataset(DataConfig(source="imagefolder", root=str(image_tree), image_size=16, loader="dataloader"))
    plain, erased = (StreamLoader(data.train, 8, torch.device("cpu"), True,
                                  DataConfig(image_size=16, augment="none", random_erasing=p, num_workers=0), seed=5)
                     for p in (0.0, 1.0))
    for loader in (plain, erased):
        loader.set_epoch(1)
    (x0, y0), (x1, y1) = next(iter(plain)), next(iter(erased))
    assert torch.equal(y0, y1)
    changed = x0 != x1  # [B, C, H, W]
    for i in range(len(y0)):
        rows, cols = changed[i].any(0).any(1), changed[i].any(0).any(0)
        assert rows.any()
        box = torch.zeros_like(changed[i][0])
        box[rows.nonzero().min():rows.nonzero().max() + 1, cols.nonzero().min():cols.nonzero().max() + 1] = True
        assert torch.equal(changed[i].any(0), box)  # exactly one rectangle, every pixel of it noise


def test_tensor_loader_copies_to_the_device_once_per_epoch_not_per_batch():
    """A copy from host memory to the GPU makes the host wait for the GPU. On the meta device
    (a device without data) every host -> device copy is visible: their number must not grow
    with the number of batches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            src = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and "cpu" in src \
                    and isinstance(out, torch.Tensor) and out.device.type == "meta":
                Copies.count += 1
            return out
    n = 640
    split = Split(labels=torch.randint(0, 10, (n,)), images=torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8))
    for erasing, most in ((0.0, 2), (0.25, 3)):  # the order, the crop/flip draws, the erasing boxes
        d = DataConfig(source="digits", image_size=16, augment="crop_flip", crop_padding=2, random_erasing=erasing)
        counts = []
        for batch in (320, 32):  # 2 and 20 batches
            loader = TensorLoader(split, batch, torch.device("meta"), True, d, seed=1)
            Copies.count = 0
            with Copies():
                batches = list(loader)
            assert len(batches) == n // batch and batches[0][0].shape == (batch, 3, 16, 16)
            counts.append(Copies.count)
        assert counts[0] == counts[1] <= most, (erasing, counts)


def test_shape_only_models_have_the_real_layers_and_flops_without_weights(tmp_path):
    from src.distillation.planner import _forward_flops
    from src.models import count_flops, shape_only
    for name, kw in (("resnet18", {}), ("vit_tiny_patch16_224", {"image_size": 32, "patch_size": 8})):
        build = lambda: create_model(name, 10, **kw)  # noqa: E731
        meta, real = shape_only(build), build()
        assert all(p.is_meta for p in meta.parameters())
        assert count_params(meta) == count_params(real)
        if name == "resnet18":  # convolutions: the same count on the meta device
            assert _forward_flops(build, 32, torch.device("cpu")) == count_flops(real, 32)

    def reads_a_file():  # a builder the meta device cannot run: the caller builds it for real
        model = create_model("resnet18", 10)
        model.load_state_dict(torch.load(tmp_path / "missing.pt", weights_only=True))
        return model
    assert shape_only(reads_a_file) is None


def test_data_sources_come_from_one_registry(tmp_path):
    """A source is one registered function: the config's check (and so the training CLI's
    --data-source) and src.evaluate's choices take their list from the registry (SVHN was added
    that way), and a torchvision source offline fails in one line with the offline alternative,
    leaving no folder behind."""
    from src.data.sources import SOURCES, source_names
    from src.evaluate import build_parser as evaluate_parser
    from tests.conftest import tiny_cfg
    assert {"digits", "cifar10", "cifar100", "imagefolder", "svhn"} <= set(source_names())
    for name in source_names():
        assert tiny_cfg(data__source=name).data.source == name
    with pytest.raises(ConfigError, match="data.source: 'svhm' is not one of .*svhn"):
        tiny_cfg(data__source="svhm")
    choices = next(a.choices for a in evaluate_parser()._actions if "--data-source" in a.option_strings)
    assert tuple(choices) == source_names()
    assert SOURCES["svhn"].title == "SVHN"
    root = tmp_path / "svhn"
    with pytest.raises(DataError, match="svhn is not in .* could not be downloaded.*imagefolder"):
        load_dataset(DataConfig(source="svhn", root=str(root)))
    assert not root.exists()


def test_model_family_traits_come_from_one_table():
    """is_vit, the factory's img_size / patch_size, the export's timm naming and the attention maps
    read one table (src/models/families.py); a new family is one register_family call."""
    from src.models.factory import is_vit
    from src.models.families import FAMILIES, Family, family_of, register_family
    assert family_of("vit_tiny_patch16_224").vit and family_of("deit_small_patch16_224").vit and is_vit("hf:vit")
    assert family_of("hf:google/vit-base-patch16-224").hugging_face and not family_of("vit_base_patch16_224").hugging_face
    assert family_of("plain_cnn10").img_size_arg and not family_of("plain_cnn10").vit
    assert family_of("resnet18").name == "timm CNN" and not is_vit("resnet18")
    try:
        register_family(Family("my ViT-like", prefixes=("myformer",), vit=True))
        assert is_vit("myformer_tiny") and family_of("myformer_tiny").name == "my ViT-like"
    finally:
        FAMILIES.pop()
