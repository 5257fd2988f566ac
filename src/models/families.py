"""Model families: the traits the rest of the project asks of a model by its name, in one table.

    family_of("vit_small_patch16_224").vit            -> True   (attention maps, patch_size, no CIFAR stem)
    family_of("plain_cnn10").img_size_arg             -> True   (its head depends on the input size)
    family_of("hf:google/vit-base-patch16-224")       -> the Hugging Face family (exported for src.load_model only)

A new family outside timm is one file: its models registered with timm (as src/models/takd_paper.py
does) and one `register_family(Family(...))` naming them. The most specific family wins (the
longest matching name prefix, an exact name before any prefix); a name no family claims is a timm
CNN.
"""
from __future__ import annotations

from dataclasses import dataclass

from .takd_paper import NEEDS_IMG_SIZE


@dataclass(frozen=True)
class Family:
    name: str
    prefixes: tuple = ()            # lower-case name prefixes it claims
    names: frozenset = frozenset()  # or exact model names
    vit: bool = False               # a transformer: token features, attention maps, patch_size
    img_size_arg: bool = False      # timm's create_model takes img_size for it
    hugging_face: bool = False      # built through transformers (`hf:` names); timm cannot load its export


FAMILIES: list = []
TIMM_CNN = Family("timm CNN")


def register_family(family: Family) -> Family:
    FAMILIES.append(family)
    return family


def family_of(name: str) -> Family:
    n = name.lower()
    exact = [f for f in FAMILIES if name in f.names]
    if exact:
        return exact[0]
    matches = [(len(p), f) for f in FAMILIES for p in f.prefixes if n.startswith(p)]
    return max(matches, key=lambda m: m[0])[1] if matches else TIMM_CNN


register_family(Family("timm ViT", prefixes=("vit", "deit", "eva", "beit"), vit=True, img_size_arg=True))
register_family(Family("Hugging Face ViT", prefixes=("hf:",), vit=True, hugging_face=True))
register_family(Family("TAKD paper plain CNN", names=frozenset(NEEDS_IMG_SIZE), img_size_arg=True))
