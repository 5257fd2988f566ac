"""Build any timm classifier by name, or a Hugging Face ViT for names starting with `hf:`.

    create_model("resnet18", 10, cifar_stem=True)                      # 32 px from scratch
    create_model("vit_tiny_patch16_224", 10, image_size=32, patch_size=4)
    create_model("resnet50", 10, pretrained=True)                      # ImageNet weights, 224 px
    create_model("hf:google/vit-base-patch16-224", 10, pretrained=True)
    create_model("hf:vit", 10, image_size=32, patch_size=4,
                 model_kwargs=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))

Every model returns logits [B, num_classes] from images [B, 3, S, S].
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .families import family_of  # its import registers the TAKD paper's models with timm
from ..utils.errors import CheckpointError, ConfigError


def is_vit(name: str) -> bool:
    """A transformer family (timm's ViT / DeiT / EVA / BEiT, a Hugging Face ViT): src/models/families.py."""
    return family_of(name).vit


def is_cnn(model) -> bool:
    """A convolutional network, decided by its layers: batch or group normalisation over
    channels, or more than one 2-d convolution (a ViT has one, its patch embedding; ConvNeXt's
    LayerNorm still sits among many). A model name is judged by its prefix (ViT families)."""
    if isinstance(model, str):
        return not is_vit(model)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    norms2d = any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) for m in model.modules())
    return norms2d or convs > 1


def has_batchnorm(model: nn.Module) -> bool:
    """True when batch statistics matter: micro-batching then changes what the model computes."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class HFImageClassifier(nn.Module):
    """Wraps a transformers image classifier so it returns logits and exposes checkpointing."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits

    def attention_maps(self, x: torch.Tensor) -> list:
        """Attention weights of every layer, [B, heads, N, N] each (eager attention for this call only)."""
        impl = self.hf.config._attn_implementation
        setter = getattr(self.hf, "set_attn_implementation", None)
        if setter is not None:
            setter("eager")
        try:
            return list(self.hf(pixel_values=x, output_attentions=True).attentions)
        finally:
            if setter is not None:
                setter(impl)

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # [CLS]

    def gradient_checkpointing_enable(self):
        # transformers 5.x renamed it activation_checkpointing_enable; older releases only have the first name.
        fn = getattr(self.hf, "activation_checkpointing_enable", None) or self.hf.gradient_checkpointing_enable
        fn()

    @property
    def is_gradient_checkpointing(self) -> bool:
        flag = getattr(type(self.hf), "is_activation_checkpointing", None)
        return bool(self.hf.is_activation_checkpointing if flag is not None else
                    getattr(self.hf, "is_gradient_checkpointing", False))


def _offline_hint(what: str, exc: Exception) -> ConfigError:
    return ConfigError(
        f"could not load {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}). "
        f"Without a network: run once where the hub is reachable (weights are cached), or set "
        f"`pretrained_file: /path/to/weights` in the stage, or `pretrained: false` to train from scratch")


def _create_hf(name: str, num_classes: int, image_size: Optional[int], patch_size: Optional[int],
               pretrained: bool, drop_path: float, model_kwargs: dict) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification  # transformers only for `hf:` models (seconds to import)
    hub_id = name[3:]
    extra = dict(model_kwargs)
    if image_size:
        extra["image_size"] = image_size
    if patch_size:
        extra["patch_size"] = patch_size
    if pretrained:
        try:
            model = ViTForImageClassification.from_pretrained(
                hub_id, num_labels=num_classes, ignore_mismatched_sizes=True, **extra)
        except Exception as exc:
            raise _offline_hint(f"Hugging Face weights {hub_id!r}", exc) from None
    else:
        if "/" in hub_id:
            try:
                config = ViTConfig.from_pretrained(hub_id, num_labels=num_classes, **extra)
            except Exception as exc:
                raise _offline_hint(f"the Hugging Face config {hub_id!r}", exc) from None
        else:  # "hf:vit": shapes from model_kwargs
            config = ViTConfig(num_labels=num_classes, **extra)
        model = ViTForImageClassification(config)
    return HFImageClassifier(model)


def _has_resnet_stem(model: nn.Module) -> bool:
    return isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")


def has_cifar_stem(model: nn.Module) -> bool:
    """Whether the model carries the CIFAR stem (3x3 stride-1 conv1, no max-pool), which timm
    cannot rebuild by name."""
    conv1 = getattr(model, "conv1", None)
    return (isinstance(getattr(model, "maxpool", None), nn.Identity) and isinstance(conv1, nn.Conv2d)
            and conv1.kernel_size == (3, 3) and conv1.stride == (1, 1))


def _cifar_stem(model: nn.Module, name: str, mode) -> None:
    """cifar_stem: true (a ResNet-style model is required), auto (applied where the model has a
    ResNet stem, left alone elsewhere: plain CNNs, ViTs), false."""
    if not _has_resnet_stem(model):
        if mode == "auto":
            return
        raise ConfigError(f"cifar_stem applies to ResNet-style models (conv1 + maxpool); {name} has neither: "
                          f"set cifar_stem: auto for that stage (applied only where it fits) or false")
    conv1 = model.conv1
    model.conv1 = nn.Conv2d(3, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def create_model(name: str, num_classes: int, *, image_size: Optional[int] = None, pretrained: bool = False,
                 pretrained_file: Optional[str] = None, cifar_stem: Union[bool, str] = False, patch_size: Optional[int] = None,
                 drop_path: float = 0.0, model_kwargs: Optional[dict] = None) -> nn.Module:
    """Build a classifier with `num_classes` outputs. Raises ConfigError for unknown names or
    weights that cannot be had (with the offline alternatives)."""
    model_kwargs = dict(model_kwargs or {})
    family = family_of(name)
    if family.hugging_face:
        return _create_hf(name, num_classes, image_size, patch_size, pretrained, drop_path, model_kwargs)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs = dict(model_kwargs, num_classes=num_classes)
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    if family.img_size_arg:
        if image_size:
            kwargs["img_size"] = image_size
        if patch_size and family.vit:
            kwargs["patch_size"] = patch_size
    if pretrained_file:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
    try:
        model = timm.create_model(name, pretrained=pretrained or bool(pretrained_file), **kwargs)
    except (ConfigError, TypeError):
        raise
    except Exception as exc:
        if pretrained or pretrained_file:
            raise _offline_hint(f"ImageNet weights for {name}" + (f" from {pretrained_file}" if pretrained_file else ""), exc) from None
        raise
    if cifar_stem:
        _cifar_stem(model, name, cifar_stem)
    return model


def shape_only(builder: Callable[[], nn.Module]) -> Optional[nn.Module]:
    """What `builder` makes, built on the meta device: every layer and shape, no memory and no
    initialisation (ResNet-50: 0.2 s instead of 1-3 s on a CPU); None for a model that cannot be
    built there (one that reads a file, say)."""
    try:
        with torch.device("meta"):
            return builder()
    except Exception:  # noqa: BLE001 (any model family: the caller builds it for real instead)
        return None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, image_size: int, device: Optional[torch.device] = None) -> int:
    """Forward FLOPs for one image (torch.utils.flop_counter: a multiply-add counts 2)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def check_state_dict(model: nn.Module, state: dict, source: str) -> None:
    """Raise CheckpointError naming the mismatch (architecture or class count) before loading."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: architecture does not match the model ({len(missing)} missing keys, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}). Check the stage's model name")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            head = k.split(".")[0] in ("fc", "head", "classifier") or "classifier" in k or k.startswith("head")
            what = "class count" if head else "shape"
            raise CheckpointError(f"{source}: {what} does not match at {k}: checkpoint {tuple(state[k].shape)}, "
                                  f"model {tuple(v.shape)}")
