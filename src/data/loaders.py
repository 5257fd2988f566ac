"""Batches on the training device.

`TensorLoader` keeps the whole uint8 split on the device (a CIFAR-10 train split is 150 MB) and
does crop, flip, resize, normalisation and random erasing there, in batches (a fixed number of
kernels per batch, whatever its size): no CPU worker sits between the GPU and its data, which
matters on a 2-core laptop. `StreamLoader` is the classic torchvision DataLoader path for image
trees that do not fit in memory; both yield (images float [B, 3, S, S] normalised, one memory
layout for every batch, labels int64 [B]) on the device.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .sources import MEANS, DatasetSplits, Split, open_rgb
from ..utils.reproducibility import epoch_seed, seed_worker


def crop_flip_draws(n: int, padding: int, flip: bool, generator: torch.Generator, device: torch.device) -> tuple:
    """Random crop offsets (dy, dx) and flip mask for `n` samples, drawn from a CPU generator and
    copied to `device` in one go. A copy from ordinary host memory makes the host wait for the
    GPU, so a loader draws a whole epoch's worth at its start, not three small copies per batch."""
    draws = torch.stack([torch.randint(0, 2 * padding + 1, (n,), generator=generator),
                         torch.randint(0, 2 * padding + 1, (n,), generator=generator),
                         (torch.rand(n, generator=generator) < 0.5).long() if flip else torch.zeros(n, dtype=torch.long)])
    dy, dx, mask = draws.to(device).unbind(0)
    return dy, dx, mask.bool()


def apply_crop_flip(x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Crop each sample of x [B, C, H, W] at (dy, dx) of its reflect-padded copy and flip where
    `mask` is set; dy, dx, mask: [B] on x's device. No host synchronisation."""
    b, c, h, w = x.shape
    dev = x.device
    if padding > 0:
        xp = F.pad(x, (padding,) * 4, mode="reflect")
        rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])  # [B, H]
        cols = (torch.arange(w, device=dev)[None, :] + dx[:, None])  # [B, W]
        bi = torch.arange(b, device=dev)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (reflect-padded by `padding`) and horizontal flip of x: [B, C, H, W]."""
    dy, dx, mask = crop_flip_draws(x.shape[0], padding, flip, generator, x.device)
    return apply_crop_flip(x, padding, dy, dx, mask)


ERASE_AREA = (0.02, 1 / 3)                           # of the image (Zhong et al. 2020; timm's defaults)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ERASE_TRIES = 10


def erasing_draws(n: int, height: int, width: int, probability: float, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """Random-erasing boxes (top, left, height, width) [4, n] for `n` samples, drawn as timm's
    RandomErasing draws them: each sample is erased with `probability`, by one box of area
    U(0.02, 1/3) of the image and aspect ratio log-uniform in [0.3, 1/0.3], the first of 10 tries
    that fits inside the image (none fits: not erased). Height 0 means not erased. Drawn from a
    CPU generator for the whole set at once, then copied to `device` in one go."""
    area = torch.empty(n, ERASE_TRIES).uniform_(*ERASE_AREA, generator=generator) * (height * width)
    aspect = torch.empty(n, ERASE_TRIES).uniform_(*ERASE_LOG_ASPECT, generator=generator).exp()
    box_h, box_w = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
    fits = (box_h < height) & (box_w < width)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits
    box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
    erase = (torch.rand(n, generator=generator) < probability) & fits.any(1)
    top = (torch.rand(n, generator=generator) * (height - box_h + 1)).long().clamp_(max=height - 1)
    left = (torch.rand(n, generator=generator) * (width - box_w + 1)).long().clamp_(max=width - 1)
    return torch.stack([top, left, box_h * erase, box_w * erase]).to(device)


def apply_erasing(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Fill each sample's box of x [B, C, H, W] (normalised) with per-pixel N(0, 1) noise, as timm's
    mode='pixel' does; boxes: [4, B] (top, left, height, width) on x's device. A fixed number of
    kernels whatever B (timm's loop launches two per erased image), no host synchronisation,
    x's layout kept."""
    top, left, box_h, box_w = boxes[:, :, None].unbind(0)  # each [B, 1]
    rows = torch.arange(x.shape[2], device=x.device)[None, :]
    cols = torch.arange(x.shape[3], device=x.device)[None, :]
    inside_rows = (rows >= top) & (rows < top + box_h)    # [B, H]
    inside_cols = (cols >= left) & (cols < left + box_w)  # [B, W]
    mask = inside_rows[:, None, :, None] & inside_cols[:, None, None, :]
    return torch.where(mask, torch.randn_like(x), x)


class Normalizer:
    """float [0, 1] images -> the model's input: resized to image_size (bilinear, antialiased when
    shrinking), normalised, in the model's memory layout. The one normalisation of training,
    evaluation, attention maps and inference (`normalize`: a name of MEANS, or (mean, std))."""

    def __init__(self, normalize, device: torch.device, image_size: int, channels_last: bool):
        mean, std = MEANS[normalize] if isinstance(normalize, str) else normalize
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.image_size = image_size
        self.channels_last = channels_last

    def __call__(self, x_float01: torch.Tensor) -> torch.Tensor:
        x = x_float01
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.image_size)
        x = (x - self.mean) / self.std
        # One layout for every batch, whatever the augmentation left (the crop's gather leaves NHWC
        # strides): a compiled model is specialised to its input's strides, and a batch of another
        # layout than its warm-up's would recompile it in the middle of an epoch.
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


class TensorLoader:
    """Whole split on `device`; shuffled, augmented batches generated there.

    The shuffling and augmentation draw from a CPU generator seeded by (seed, epoch), so an
    epoch's batches are the same whether or not the run was interrupted before it.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device, train: bool, data_cfg,
                 channels_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.images = split.images.to(device, non_blocking=True)
        self.labels = split.labels.to(device, non_blocking=True)
        self.batch_size = batch_size
        self.train = train
        self.cfg = data_cfg
        self.seed = seed
        self.epoch = 0
        self.drop_last = train and self._local_count() > batch_size
        self.norm = Normalizer(data_cfg.normalize, device, data_cfg.image_size, channels_last)
        self.erasing = data_cfg.random_erasing if train else 0.0
        self.batch_index: Optional[torch.Tensor] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _local_count(self) -> int:
        """Samples this rank sees: training shards are cut to equal length, evaluation shards are not."""
        n, w = len(self.labels), self.world_size
        if w == 1:
            return n
        return n // w if self.train else len(range(self.rank, n, w))

    def __len__(self) -> int:
        n = self._local_count()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self) * self.batch_size if self.drop_last else self._local_count()

    def _order(self, g: torch.Generator) -> torch.Tensor:
        n, w = len(self.labels), self.world_size
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        if w > 1:  # every rank draws the same permutation and takes its own stride of it
            order = order[: (n // w) * w] if self.train else order
            order = order[self.rank::w]
        return order.to(self.images.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches without a host synchronisation: the epoch's order and augmentation draws reach
        the device once, here; each batch only slices and indexes tensors already there."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = self._order(g)
        # augmentation draws differ between ranks; with one process they come from the same stream
        aug_g = g if self.world_size == 1 else torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank))
        n = len(order)
        augment = self.train and self.cfg.augment != "none"
        pad = self.cfg.crop_padding if self.cfg.augment == "crop_flip" else 0
        if augment:
            dy, dx, mask = crop_flip_draws(n, pad, True, aug_g, self.images.device)
        if self.erasing > 0:
            size = self.cfg.image_size
            boxes = erasing_draws(n, size, size, self.erasing, aug_g, self.images.device)
        for i in range(len(self)):
            part = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            idx = order[part]
            x, y = self.images[idx], self.labels[idx]
            if augment:
                x = apply_crop_flip(x, pad, dy[part], dx[part], mask[part])
            x = self.norm(x.float().div_(255))
            if self.erasing > 0:
                x = apply_erasing(x, boxes[:, part])
            self.batch_index = idx  # which images of the split this batch holds (cached teacher logits)
            yield x, y

    @property
    def same_inputs_every_epoch(self) -> bool:
        """True when an image enters the model identically in every epoch (no augmentation): what
        a frozen teacher computes on it can then be computed once."""
        return not self.train or (self.cfg.augment == "none" and self.erasing == 0)

    def in_order(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images, their indices) of the whole split in index order, as the training
        batches present them when nothing is augmented."""
        for start in range(0, len(self.labels), self.batch_size):
            idx = torch.arange(start, min(len(self.labels), start + self.batch_size), device=self.images.device)
            yield self.norm(self.images[idx].float().div_(255)), idx


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform):
        self.files, self.labels, self.transform = split.files, split.labels.tolist(), transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(open_rgb(self.files[i])), self.labels[i]


class StreamLoader:
    """torchvision transforms in a CPU DataLoader, for trees too large for memory (and the
    naive baseline of the benchmarks). Yields normalised float batches on `device`."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, train: bool, data_cfg,
                 channels_last: bool = False, seed: int = 0, from_tensors: bool = False, rank: int = 0,
                 world_size: int = 1):
        from torchvision import transforms as T  # torchvision's transforms only for the streaming loader
        mean, std = MEANS[data_cfg.normalize]
        size = data_cfg.image_size
        aug = []
        if train and data_cfg.augment != "none":
            if data_cfg.augment == "crop_flip":
                aug.append(T.RandomCrop(size, padding=data_cfg.crop_padding * size // 32 or None, padding_mode="reflect"))
            aug.append(T.RandomHorizontalFlip())
        if from_tensors:  # uint8 tensors -> same transforms as on files (benchmark baseline)
            tf = T.Compose([T.Resize(size, antialias=True), *aug, T.ConvertImageDtype(torch.float32), T.Normalize(mean, std)])
            ds = torch.utils.data.TensorDataset(split.images, split.labels)
            ds = _Mapped(ds, tf)
        else:
            tf = T.Compose([T.Resize(size), T.CenterCrop(size), *aug, T.ToTensor(), T.Normalize(mean, std)])
            ds = _FileDataset(split, tf)
        self.device = device
        self.channels_last = channels_last
        self.train = train
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.erasing = data_cfg.random_erasing if train else 0.0
        self.batch_index: Optional[torch.Tensor] = None  # evaluation: the dataset indices of the last batch
        self.seed, self.rank = seed, rank
        self.erase_generator = torch.Generator().manual_seed(epoch_seed(seed, 0, rank))
        self.sampler = None
        if world_size > 1:
            self.sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=train,
                                                               seed=seed, drop_last=train)
        self.loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=train and self.sampler is None, sampler=self.sampler,
            drop_last=train and len(ds) // world_size > batch_size,
            num_workers=data_cfg.num_workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
            generator=self.generator, persistent_workers=data_cfg.num_workers > 0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        self.erase_generator.manual_seed(epoch_seed(self.seed, epoch, self.rank))  # the erasing boxes differ by rank
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return len(self.loader) * self.batch_size if self.loader.drop_last else len(self.loader.sampler)

    def _indices(self) -> list:
        """The dataset indices of this epoch's samples, in the order the loader yields them (evaluation
        only: a training loader shuffles with its own generator)."""
        return list(self.sampler) if self.sampler is not None else list(range(len(self.loader.dataset)))

    def __iter__(self):
        order = None if self.train else self._indices()
        done = 0
        for x, y in self.loader:
            if order is not None:
                self.batch_index = torch.as_tensor(order[done:done + len(y)])
                done += len(y)
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.erasing > 0:  # as the in-memory loader does; these batches come from the host anyway
                x = apply_erasing(x, erasing_draws(x.shape[0], x.shape[2], x.shape[3], self.erasing,
                                                   self.erase_generator, self.device))
            yield x, torch.as_tensor(y).to(self.device, non_blocking=True)


class _Mapped(torch.utils.data.Dataset):
    def __init__(self, ds, tf):
        self.ds, self.tf = ds, tf

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return self.tf(x), y


def build_loaders(data: DatasetSplits, batch_size: int, device: torch.device, data_cfg, channels_last: bool,
                  seed: int, eval_batch_size: Optional[int] = None, rank: int = 0, world_size: int = 1) -> dict:
    """{'train', 'val', 'test'} loaders of the kind the dataset allows (in memory or streamed).

    `batch_size` is the global batch: with `world_size` ranks each loads batch_size / world_size.
    """
    cls = TensorLoader if data.in_memory else StreamLoader
    per_rank = max(1, batch_size // world_size)
    eval_bs = eval_batch_size or max(per_rank, 256)
    kw = dict(rank=rank, world_size=world_size)
    return {
        "train": cls(data.train, per_rank, device, True, data_cfg, channels_last, seed, **kw),
        "val": cls(data.val, eval_bs, device, False, data_cfg, channels_last, seed, **kw),
        "test": cls(data.test, eval_bs, device, False, data_cfg, channels_last, seed, **kw) if len(data.test) else None,
    }
