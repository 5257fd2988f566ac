"""Attention maps of a ViT's last block, overlaid on input images.

Safety rules, since attention is O(N^2) in memory:
1. everything runs under torch.no_grad();
2. one batch of at most 8 images; 3. at most 2 heads;
4. only every N epochs (the caller decides; config viz.attention_every, default 10);
5. hooks are removed and attention tensors released before returning.

timm's fused attention (scaled_dot_product_attention) never materialises the weights, so they
are recomputed for this one batch from the block's own qkv projection. Hugging Face ViTs
return them with output_attentions=True (eager attention for that call only).
"""
from __future__ import annotations

import gc
import math
from pathlib import Path

import torch
from torch import nn

from ..utils.checkpoint import atomic_write_file

MAX_IMAGES, MAX_HEADS = 8, 2


def _timm_attention_modules(model: nn.Module) -> list:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks: not a timm ViT")
    return [b.attn for b in blocks]


def _weights_from_qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention [B, H, N, N] recomputed from a timm Attention module's input x: [B, N, C]."""
    b, n, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * heads)
    qkv = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def attention_weights(model: nn.Module, images: torch.Tensor, all_layers: bool = False) -> list:
    """Attention weights [B, H, N, N] of the last block (or of every block), for one batch."""
    if hasattr(model, "attention_maps"):  # Hugging Face wrapper
        maps = model.attention_maps(images)
        return maps if all_layers else maps[-1:]
    modules = _timm_attention_modules(model)
    if not all_layers:
        modules = modules[-1:]
    captured: list = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.append(_weights_from_qkv(mod, args[0])))
             for m in modules]
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    return captured


def attention_rollout(layers: list) -> torch.Tensor:
    """Abnar & Zuidema (2020): product over layers of (head-mean attention + identity), renormalised."""
    result = None
    for a in layers:
        a = a.float().mean(1)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result  # [B, N, N]


def _cls_to_patches(att: torch.Tensor, prefix: int) -> torch.Tensor:
    """Row of the CLS token over the patch tokens, as a square grid [B, g, g]."""
    row = att[:, 0, prefix:]
    g = int(math.isqrt(row.shape[-1]))
    return row[:, : g * g].reshape(-1, g, g)


def save_attention_maps(model: nn.Module, images: torch.Tensor, raw_images: torch.Tensor, path: Path,
                        heads: int = 2, rollout: bool = False, title: str = "") -> Path:
    """Write a PNG grid: each row an input image, then CLS attention of up to 2 heads of the last
    block (and the rollout over all blocks), overlaid on the image.

    images: normalised model input [B, 3, S, S]; raw_images: uint8 [B, 3, H, W] for display.
    """
    import matplotlib  # heavy at start-up: imported when a figure is drawn, not with the module
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # with matplotlib above
    n = min(MAX_IMAGES, images.shape[0])
    maps, names = _cls_maps(model, images[:n], max(1, min(MAX_HEADS, heads)), rollout)
    fig = _attention_grid(plt, raw_images[:n].permute(0, 2, 3, 1).cpu().numpy(), maps, names)
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: the map of a finished epoch is never drawn again on resume, so a kill part-way
    # through savefig would otherwise leave a cut PNG that the report cannot read
    atomic_write_file(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    del maps
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def _cls_maps(model: nn.Module, images: torch.Tensor, heads: int, rollout: bool) -> tuple[list, list]:
    """CLS attention of the last block's first `heads` heads (and the rollout) as token grids
    [B, g, g] on the CPU, in eval mode and without gradients; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            layers = attention_weights(model, images, all_layers=rollout)
            prefix = int(getattr(model, "num_prefix_tokens", 1))
            last = layers[-1]
            maps = [_cls_to_patches(last[:, h], prefix) for h in range(min(heads, last.shape[1]))]
            names = [f"head {h}" for h in range(len(maps))]
            if rollout:
                maps.append(_cls_to_patches(attention_rollout(layers), prefix))
                names.append("rollout")
            del layers, last
    finally:
        model.train(was_training)
    return [m.float().cpu() for m in maps], names  # shown as they are (no smoothing)


def _attention_grid(plt, shown, maps: list, names: list):
    """One row per image: the image, then each map over it (one cell per token), one colour scale."""
    n, size = shown.shape[0], shown.shape[1]
    vmax = max(float(m.max()) for m in maps) if maps else 1.0
    cols = 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(2.0 * cols + 0.8, 2.0 * n + 0.6), squeeze=False)
    im = None
    for i in range(n):
        axes[i, 0].imshow(shown[i])
        for j, m in enumerate(maps, start=1):
            axes[i, j].imshow(shown[i])
            # one cell per token: nearest, over the image's extent, so a 3x3 grid looks like 3x3
            im = axes[i, j].imshow(m[i].numpy(), cmap="inferno", alpha=0.6, interpolation="nearest", vmin=0.0,
                                   vmax=vmax, extent=(-0.5, size - 0.5, size - 0.5, -0.5))
        for j in range(cols):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title("input" if j == 0 else names[j - 1], fontsize=10)
    if im is not None:
        g = maps[0].shape[-1]
        fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), shrink=0.8,
                     label=f"CLS attention weight ({g}x{g} patch tokens)")
    return fig
