"""Dataset sources. Each yields train / val / test splits as uint8 image tensors [N, 3, S, S]
plus int64 labels [N], or, for an image tree too large for memory, file lists for a streaming
DataLoader.

- digits: scikit-learn's bundled 8x8 digits, upscaled to RGB (offline; demos and tests);
  a fixed 20% of it (split_seed) is the test split.
- cifar10 / cifar100: torchvision, downloaded into data.root when a network is there.
- imagefolder: `root/train/<class>/*` plus `root/test/<class>/*` (or `root/val/`). Images are
  decoded once (any mode: grey, RGBA, CMYK, palette -> RGB; any size -> one square size) and
  cached on disk as a uint8 tensor file keyed by the file list.

The validation split is carved from train with a fixed seed, stratified by class.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from ..utils.devices import GiB
from ..utils.errors import DataError
from ..utils.logger import get_console

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MEANS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
         "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
         # the TAKD authors' data_loader.py: CIFAR-100's statistics, used for CIFAR-10 and CIFAR-100 alike
         "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))}
# Above this many bytes of decoded images, loader=auto streams from disk instead.
TENSOR_LIMIT_BYTES = 6 * GiB


@dataclass
class Split:
    """One split: images uint8 [N, 3, S, S] and labels int64 [N] (tensor mode), or file paths."""
    labels: torch.Tensor
    images: Optional[torch.Tensor] = None
    files: Optional[list] = None
    ids: Optional[list] = None          # per-image id for predictions files (relative path, or index)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetSplits:
    train: Split
    val: Split
    test: Split
    classes: list
    store_size: int
    name: str
    skipped_files: list = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_memory(self) -> bool:
        return self.train.images is not None


# ----------------------------------------------------------------------------- the registry of sources
@dataclass(frozen=True)
class Source:
    """A data source: `load(data_config)` -> (train Split, test Split, classes, stored size, skipped files)."""
    name: str
    title: str                     # for reports and figure titles
    load: Callable
    help: str = ""
    toy: bool = False              # a pipeline check, not a result (scikit-learn's 8x8 digits): reports say so


SOURCES: dict = {}


def register_source(name: str, title: str, help: str = "", toy: bool = False):
    """Decorator: a function (data config -> train, test, classes, size, skipped) becomes
    `data.source: <name>`; the config's choices, the CLI's --data-source and src.evaluate take
    their list from here."""
    def deco(fn):
        SOURCES[name] = Source(name, title, fn, help, toy)
        return fn
    return deco


def source_names() -> tuple:
    return tuple(SOURCES)


def _stratified_take(labels: np.ndarray, n: Optional[int], seed: int) -> np.ndarray:
    idx = np.arange(len(labels))
    if n is None or n >= len(labels):
        return idx
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and n >= len(counts) else None
    kept, _ = train_test_split(idx, train_size=n, random_state=seed, stratify=stratify)
    return np.sort(kept)


def _split_val(labels: np.ndarray, fraction: float, seed: int, classes: Optional[list] = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Validation indices carved from train, stratified by class. A class with a single image
    cannot be split: that image stays in train (said once), and the other classes keep their
    stratification (one such class used to turn it off for every class)."""
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    single = np.isin(labels, np.flatnonzero(counts == 1))
    rest = idx[~single]
    n_val = max(1, int(round(fraction * len(labels))))
    if single.any():
        names = [classes[c] if classes else str(c) for c in np.flatnonzero(counts == 1)]
        get_console().warning(f"⚠️  {len(names)} class(es) with a single training image ({', '.join(names[:5])}): "
                              f"kept in train, none of them in the validation split")
    if len(rest) < 2:  # nothing can be split by class: a plain random split of everything
        train_idx, val_idx = train_test_split(idx, test_size=min(n_val, len(idx) - 1), random_state=seed)
        return np.sort(train_idx), np.sort(val_idx)
    n_val = min(n_val, len(rest) - 1)
    splittable = len(np.unique(labels[rest]))
    stratify = labels[rest] if n_val >= splittable and len(rest) - n_val >= splittable else None
    train_idx, val_idx = train_test_split(rest, test_size=n_val, random_state=seed, stratify=stratify)
    return np.sort(np.concatenate([train_idx, idx[single]])), np.sort(val_idx)


def _subset(split: Split, idx: np.ndarray) -> Split:
    t = torch.as_tensor(idx, dtype=torch.long)
    return Split(labels=split.labels[t],
                 images=split.images[t] if split.images is not None else None,
                 files=[split.files[i] for i in idx] if split.files is not None else None,
                 ids=[split.ids[i] for i in idx] if split.ids is not None else None)


# ----------------------------------------------------------------------------- digits
def _digits(store_size: int, seed: int) -> tuple[Split, Split, list]:
    from sklearn.datasets import load_digits  # scikit-learn's datasets only when digits are read
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(store_size, store_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, random_state=seed, stratify=d.target)
    tr, te = np.sort(tr), np.sort(te)
    return (Split(y[tr], x[tr]), Split(y[te], x[te]), [str(i) for i in range(10)])


# ----------------------------------------------------------------------------- torchvision CIFAR
OFFLINE_EXAMPLE = "--data-source imagefolder --data-root ../shared/data/cifar10-jpeg.tar.gz"


def _torchvision_or_offline(source: str, root: Path, make):
    """`make(download)` -> a torchvision dataset: the files in `root`, else a download; offline, one
    DataError with the offline alternatives, and no folder left behind by the failed download."""
    existed = root.exists()
    try:
        return make(False)
    except RuntimeError:
        try:
            return make(True)
        except Exception as exc:  # URLError, socket errors, ...
            if not existed:
                shutil.rmtree(root, ignore_errors=True)
            reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            raise DataError(
                f"{source} is not in {root} and could not be downloaded ({reason}). Offline, train on an image "
                f"tree or its .tar.gz as it is, e.g. {OFFLINE_EXAMPLE} (or --data-source digits for a demo); "
                f"or put the torchvision '{source}' files in --data-root"
            ) from None


def _cifar(source: str, root: Path, read_test: bool = True) -> tuple[Split, Split, list]:
    from torchvision import datasets  # torchvision's datasets only for its own sources (slow to import)
    cls = datasets.CIFAR10 if source == "cifar10" else datasets.CIFAR100
    out = []
    for train in (True, False)[:2 if read_test else 1]:
        ds = _torchvision_or_offline(source, root, lambda download: cls(str(root), train=train, download=download))
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        out.append(Split(torch.tensor(ds.targets, dtype=torch.long), images))
    return out[0], out[1] if read_test else _empty(32), list(ds.classes)


# ----------------------------------------------------------------------------- ImageFolder trees
def scan_image_folder(split_dir: Path, classes: Optional[list] = None) -> tuple[list, list, list]:
    """Return (files, labels, classes) for `split_dir/<class>/*`, refusing missing or empty folders."""
    if not split_dir.is_dir():
        raise DataError(f"dataset folder not found: {split_dir} (expected <root>/train/<class>/* and <root>/test/<class>/*)")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"{split_dir} has no class folders: put each class's images in {split_dir}/<class name>/")
    if classes is not None and found != classes:
        raise DataError(f"{split_dir}: class folders {found} differ from the training classes {classes}")
    files, labels = [], []
    for label, name in enumerate(found):
        imgs = sorted(str(p) for p in (split_dir / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not imgs:
            raise DataError(f"class folder {split_dir / name} has no images ({', '.join(IMG_EXTENSIONS)}); "
                            f"add images or remove the folder")
        files += imgs
        labels += [label] * len(imgs)
    return files, labels, found


def open_rgb(path: str):
    """Open any image as RGB (grey, RGBA, CMYK, palette, 16-bit converted); DataError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "RGBA" or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, (0, 0, 0))
                bg.paste(im, mask=im.split()[-1])
                return bg
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                arr = 255 * arr / max(float(arr.max()), 1.0)
                return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}. Remove or replace it, "
                        f"or set data.skip_bad_images: true to skip unreadable files") from None


def _square(im, size: int):
    """Resize the shorter side to `size` and centre-crop to size x size."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _progress_iter(items: list, desc: str, every_s: float = 30.0):
    """A tqdm bar on a terminal; elsewhere a line with rate and time left every `every_s` seconds."""
    if sys.stdout.isatty():
        yield from tqdm(items, desc=desc, unit="img", leave=False, mininterval=1.0)
        return
    t0 = last = time.perf_counter()
    for i, item in enumerate(items):
        yield item
        now = time.perf_counter()
        if now - last >= every_s:
            rate = (i + 1) / (now - t0)
            get_console().info(f"    {desc}: {i + 1:,}/{len(items):,} images, {rate:,.0f}/s, "
                               f"{(len(items) - i - 1) / rate:.0f}s left")
            last = now


def decode_images(files: list, labels: list, size: int, skip_bad: bool, desc: str = "decode") -> tuple[Split, list]:
    images = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    keep, skipped = [], []
    for i, path in enumerate(_progress_iter(files, desc)):
        try:
            im = _square(open_rgb(path), size)
        except DataError:
            if not skip_bad:
                raise
            skipped.append(path)
            continue
        images[i] = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
        keep.append(i)
    idx = torch.tensor(keep, dtype=torch.long)
    return Split(torch.tensor(labels, dtype=torch.long)[idx], images[idx]), skipped


def _cache_key(files: list, size: int) -> str:
    h = hashlib.sha256(f"v1:{size}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _first_image_size(path: str) -> int:
    try:
        with Image.open(path) as im:
            return max(im.size)
    except Exception:
        return 0


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
EXTRACT_DIR = Path(__file__).resolve().parents[2] / ".data_cache"


def extract_archive(archive: Path, dest_root: Path = EXTRACT_DIR) -> Path:
    """Unpack an ImageFolder tree shipped as a tarball once; return the folder holding train/."""
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    dest = dest_root / name
    marker = dest / ".complete"
    if not marker.exists():
        get_console().info(f"Extracting {archive} to {dest} (once)")
        tmp = dest.with_name(dest.name + ".partial")
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")  # refuses absolute paths, links out of the tree
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-extracted stays behind
            what = "truncated or corrupt" if isinstance(exc, (EOFError, zlib.error, tarfile.ReadError)) else "unreadable"
            detail = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:120]
            raise DataError(f"{archive} is {what} ({type(exc).__name__}: {detail}); copy or download it again, "
                            f"or point --data-root at an unpacked tree") from None
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        marker.write_text("ok")
    hits = [p.parent for p in sorted(dest.rglob("train")) if p.is_dir()]
    if not hits:
        raise DataError(f"{archive} holds no train/ folder: expected <root>/train/<class>/* and <root>/test/<class>/*")
    return hits[0]


def _imagefolder(d, store_size_hint: int) -> tuple[Split, Split, list, int, list]:
    train, test, classes, size, skipped, root, test_files = _imagefolder_splits(d, store_size_hint)
    bad = set(skipped)
    ids = [os.path.relpath(f, root) for f in test_files if f not in bad]
    if len(ids) == len(test):
        test.ids = ids
    return train, test, classes, size, skipped


def _imagefolder_splits(d, store_size_hint: int):
    root = Path(d.root).expanduser()
    if root.is_file() and root.name.endswith(ARCHIVE_SUFFIXES):
        root = extract_archive(root)
    if root.is_file():
        raise DataError(f"{root} is a file, not a dataset folder: point --data-root at a folder with train/ and test/ "
                        f"(or val/), or at a .tar.gz / .tgz / .tar of one")
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}. Point data.root (or --data-root) at a folder with train/ and "
                        f"test/ (or val/), or at a .tar.gz / .tgz / .tar of one")
    train_files, train_labels, classes = scan_image_folder(root / "train")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if test_dir is None:
        raise DataError(f"{root} has train/ but neither test/ nor val/: add one for the final evaluation")
    # data.read_test false (a search's trial): the test folder is not even listed
    test_files, test_labels, _ = scan_image_folder(test_dir, classes) if d.read_test else ([], [], classes)
    # data.max_*_samples: decode only the images that will be used (the same stratified draw as later)
    keep = _stratified_take(np.asarray(train_labels), d.max_train_samples, d.split_seed)
    train_files, train_labels = [train_files[i] for i in keep], [train_labels[i] for i in keep]
    keep = _stratified_take(np.asarray(test_labels), d.max_test_samples, d.split_seed)
    test_files, test_labels = [test_files[i] for i in keep], [test_labels[i] for i in keep]
    native = _first_image_size(train_files[0]) or store_size_hint
    size = min(store_size_hint, native)  # small images stay native; the device resizes per batch
    n_bytes = (len(train_files) + len(test_files)) * 3 * size * size
    mode = d.loader if d.loader != "auto" else ("tensor" if n_bytes <= TENSOR_LIMIT_BYTES else "dataloader")
    if mode == "dataloader":
        return (Split(torch.tensor(train_labels), files=train_files), Split(torch.tensor(test_labels), files=test_files),
                classes, size, [], root, test_files)
    cache_dir = Path(d.cache_dir).expanduser() if d.cache_dir else root / ".cache"
    # one cache per split: another train subset (data.max_train_samples) reuses the decoded test split
    train, skipped_tr = _decoded_split(train_files, train_labels, size, d.skip_bad_images, cache_dir, "train")
    test, skipped_te = (_decoded_split(test_files, test_labels, size, d.skip_bad_images, cache_dir, "test")
                        if test_files else (_empty(size), []))
    return train, test, classes, size, skipped_tr + skipped_te, root, test_files


def _empty(size: int) -> Split:
    """A split with no images: the test split of a run that must not read it (data.read_test false)."""
    return Split(torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, size, size, dtype=torch.uint8))


def _decoded_split(files: list, labels: list, size: int, skip_bad: bool, cache_dir: Path, name: str
                   ) -> tuple[Split, list]:
    """One split's images decoded once and cached on disk, keyed by its file list (paths, sizes,
    modification times) and the stored size; a read-only dataset folder decodes again next time."""
    cache = cache_dir / f"decoded-{name}-{size}px-{_cache_key(files, size)}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        return Split(blob["labels"], blob["images"]), blob.get("skipped", [])
    get_console().info(f"Decoding {len(files):,} {name} images from {Path(files[0]).parents[1]} at {size}px "
                       f"(cached afterwards)")
    split, skipped = decode_images(files, labels, size, skip_bad, f"decode {name}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"images": split.images, "labels": split.labels, "skipped": skipped}, tmp)
        os.replace(tmp, cache)
    except OSError as exc:
        get_console().warning(f"could not write the decode cache {cache}: {exc}")
    return split, skipped


@register_source("digits", "digits (scikit-learn)", "scikit-learn's bundled 8x8 digits, offline demos and tests", toy=True)
def _digits_source(d):
    size = min(d.image_size, 32)
    return (*_digits(size, d.split_seed), size, [])


@register_source("cifar10", "CIFAR-10", "torchvision's CIFAR-10, downloaded into data.root when online")
def _cifar10_source(d):
    return (*_cifar("cifar10", Path(d.root).expanduser(), d.read_test), 32, [])


@register_source("cifar100", "CIFAR-100", "torchvision's CIFAR-100, downloaded into data.root when online")
def _cifar100_source(d):
    return (*_cifar("cifar100", Path(d.root).expanduser(), d.read_test), 32, [])


@register_source("svhn", "SVHN", "torchvision's SVHN (train and test splits), downloaded into data.root when online")
def _svhn_source(d):
    from torchvision import datasets  # torchvision's datasets only for its own sources (slow to import)
    root, out = Path(d.root).expanduser(), []
    for split in ("train", "test"):
        ds = _torchvision_or_offline("svhn", root, lambda download: datasets.SVHN(str(root), split=split, download=download))
        out.append(Split(torch.as_tensor(ds.labels, dtype=torch.long), torch.from_numpy(ds.data).contiguous()))
    return out[0], out[1], [str(i) for i in range(10)], 32, []


@register_source("imagefolder", "image folder", "any tree root/train/<class>/* and root/test/<class>/* (or val/), or its .tar.gz")
def _imagefolder_source(d):
    return _imagefolder(d, d.image_size)


def classes_of(d) -> Optional[list]:
    """The class names a data config would give, without decoding an image (an image tree's train/
    folder names; digits' 0-9); None where only loading tells (torchvision's datasets)."""
    if d.source == "digits":
        return [str(i) for i in range(10)]
    if d.source != "imagefolder":
        return None
    root = Path(d.root).expanduser()
    if root.is_file() and root.name.endswith(ARCHIVE_SUFFIXES):
        root = extract_archive(root)
    train = root / "train"
    return sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else None


def load_dataset(d) -> DatasetSplits:
    """Build train / val / test from a DataConfig. Raises DataError with a fix on bad input."""
    source = SOURCES.get(d.source)
    if source is None:
        raise DataError(f"unknown data.source {d.source!r} (have {', '.join(SOURCES)})")
    train, test, classes, size, skipped = source.load(d)
    if skipped:
        get_console().warning(f"⚠️  skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
    if not d.read_test:  # a search's trial: whatever the source held of the test split is dropped unread
        test = _empty(size)
    elif len(test) < 1:
        raise DataError(f"{d.source}: no test images")
    if len(train) < 2:
        raise DataError(f"{d.source}: too few images (train {len(train)}, test {len(test)})")
    train = _subset(train, _stratified_take(train.labels.numpy(), d.max_train_samples, d.split_seed))
    test = _subset(test, _stratified_take(test.labels.numpy(), d.max_test_samples, d.split_seed))
    tr_idx, val_idx = _split_val(train.labels.numpy(), d.val_fraction, d.split_seed, classes)
    return DatasetSplits(train=_subset(train, tr_idx), val=_subset(train, val_idx), test=test,
                         classes=classes, store_size=size, name=d.source, skipped_files=skipped)
