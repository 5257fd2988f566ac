"""The models of the TAKD paper (Mirzadeh et al. 2020), registered with timm by name.

After `import src.models`, `timm.create_model("cifar_resnet20", num_classes=10)` and every preset
know them, and a stage's `model.safetensors` loads back through plain timm.

- `cifar_resnet{8,14,20,26,32,44,56,110}`: the CIFAR ResNets of the TAKD authors'
  `resnet_cifar.py` (after He et al. 2016, section 4.2, but with a 1x1 conv + BN shortcut where
  the shape changes, as the authors' code has it, not He et al.'s parameter-free one): a 3x3 stem
  with 16 channels, three stages of (depth - 2) / 6 BasicBlocks at 16, 32 and 64 channels, stride
  2 at the first block of the second and third stage, global average pooling and a linear head.
  ResNet-20 has 0.27 M parameters, ResNet-110 1.7 M.
- `plain_cnn{2,4,6,8,10}`: the paper's plain CNNs as the authors' `plain_cnn_cifar.py` builds
  them for CIFAR-10: 3x3 conv (with bias) + BN + ReLU, 2x2 max-pool (M), then fully connected
  layers (ReLU between them):
      2:  C16 M C16 M FC
      4:  C16 C16 M C32 C32 M FC
      6:  4 + C64 C64 M, FC
      8:  6 + C128 C128 M, FC64, FC
      10: C32 C32 M C64 C64 M C128 C128 M C256 C256 C256 C256 M, FC128, FC
- `plain_cnn{2,4,6,8,10}_cifar100`: the authors' CIFAR-100 table, wider (a 32-channel base):
      2:  C32 M C32 M FC                      (215,172 parameters with a 100-way head)
      4:  C32 C32 M C64 C64 M FC
      6:  C32 C32 M C64 C64 M C128 C128 FC    (no pool after the last conv, as theirs)
      8:  C32 C32 M C64 C64 M C128 C128 M C256 C256 M, FC64, FC
      10: C32 C32 M C64 C64 M C128 C128 M C256 C256 C256 C256 M, FC512, FC
"""
from __future__ import annotations

import torch
from torch import nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

RESNET_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)
PLAIN_BOOKS = {  # dataset -> layers -> (conv and pool specs, hidden FC widths): the authors' two tables
    "cifar10": {
        2: (["C16", "M", "C16", "M"], []),
        4: (["C16", "C16", "M", "C32", "C32", "M"], []),
        6: (["C16", "C16", "M", "C32", "C32", "M", "C64", "C64", "M"], []),
        8: (["C16", "C16", "M", "C32", "C32", "M", "C64", "C64", "M", "C128", "C128", "M"], [64]),
        10: (["C32", "C32", "M", "C64", "C64", "M", "C128", "C128", "M", "C256", "C256", "C256", "C256", "M"], [128]),
    },
    "cifar100": {
        2: (["C32", "M", "C32", "M"], []),
        4: (["C32", "C32", "M", "C64", "C64", "M"], []),
        6: (["C32", "C32", "M", "C64", "C64", "M", "C128", "C128"], []),
        8: (["C32", "C32", "M", "C64", "C64", "M", "C128", "C128", "M", "C256", "C256", "M"], [64]),
        10: (["C32", "C32", "M", "C64", "C64", "M", "C128", "C128", "M", "C256", "C256", "C256", "C256", "M"], [512]),
    },
}
PLAIN_LAYERS = {n: spec for n, (spec, _) in PLAIN_BOOKS["cifar10"].items()}


def _cfg(**kwargs) -> dict:
    """A pretrained config with no download: weights come from a file (pretrained_cfg_overlay)."""
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
            "first_conv": "conv1", "classifier": "fc", **kwargs}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """He et al. 2016's CIFAR ResNet of `depth` = 6n + 2 layers."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, **_ignored):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.depth, self.num_classes = depth, num_classes
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, in_ch = [], 16
        for i, width in enumerate((16, 32, 64)):
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(in_ch, width, stride=2 if (i > 0 and b == 0) else 1))
                in_ch = width
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 64
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


class PlainCNN(nn.Module):
    """The paper's plain CNN with `layers` conv + FC layers (2, 4, 6, 8 or 10) for `image_size`
    inputs, in the widths of the authors' table for `widths` (cifar10 or cifar100)."""

    def __init__(self, layers: int, num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 widths: str = "cifar10", **_ignored):
        super().__init__()
        if widths not in PLAIN_BOOKS:
            raise ValueError(f"plain CNN widths are those of {' or '.join(PLAIN_BOOKS)}, got {widths!r}")
        if layers not in PLAIN_BOOKS[widths]:
            raise ValueError(f"plain CNNs have 2, 4, 6, 8 or 10 layers, got {layers}")
        specs, hidden_widths = PLAIN_BOOKS[widths][layers]
        self.layers, self.num_classes = layers, num_classes
        features, ch, size = [], in_chans, img_size
        for spec in specs:
            if spec == "M":
                features.append(nn.MaxPool2d(2, 2))
                size //= 2
            else:
                out = int(spec[1:])
                features += [nn.Conv2d(ch, out, 3, padding=1, bias=True), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                ch = out
        if size < 1:
            raise ValueError(f"plain_cnn{layers} pools the image {specs.count('M')} times: {img_size} px is too small")
        self.features = nn.Sequential(*features)
        hidden, width = [], ch * size * size
        for h in hidden_widths:
            hidden += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.hidden = nn.Sequential(*hidden)
        self.num_features = width
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(torch.flatten(self.features(x), 1)))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


RESNET_NAMES = {f"cifar_resnet{d}": d for d in RESNET_DEPTHS}
PLAIN_NAMES = {f"plain_cnn{n}": n for n in PLAIN_LAYERS}
PLAIN_CIFAR100_NAMES = {f"plain_cnn{n}_cifar100": n for n in PLAIN_BOOKS["cifar100"]}
# Models whose head size depends on the input size: the factory passes img_size to them.
NEEDS_IMG_SIZE = frozenset(PLAIN_NAMES) | frozenset(PLAIN_CIFAR100_NAMES)

# timm reads a module's default_cfgs when a model of it is registered
default_cfgs = generate_default_cfgs({
    **{f"{name}.untrained": _cfg() for name in RESNET_NAMES},
    **{f"{name}.untrained": _cfg(first_conv="features.0") for name in [*PLAIN_NAMES, *PLAIN_CIFAR100_NAMES]},
})


def _entrypoint(name: str, cls, arg_name: str, arg: int, **fixed):
    """timm's entry point for one depth: `name(pretrained=False, **kwargs)`."""
    def fn(pretrained: bool = False, **kwargs):
        return build_model_with_cfg(cls, name, pretrained, **{arg_name: arg}, **fixed, **kwargs)
    fn.__name__, fn.__qualname__, fn.__module__ = name, name, __name__
    fn.__doc__ = f"{cls.__name__} with {arg_name}={arg} (TAKD paper)."
    globals()[name] = fn
    return register_model(fn)


for _name, _depth in RESNET_NAMES.items():
    _entrypoint(_name, CifarResNet, "depth", _depth)
for _name, _layers in PLAIN_NAMES.items():
    _entrypoint(_name, PlainCNN, "layers", _layers)
for _name, _layers in PLAIN_CIFAR100_NAMES.items():
    _entrypoint(_name, PlainCNN, "layers", _layers, widths="cifar100")
