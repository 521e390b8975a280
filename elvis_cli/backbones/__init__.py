"""Backbones by name: the offline EfficientNet-Lite default and the paper's ViTs.

Backbone modules are imported only when one is created, and base.py's names on first use, so
`import elvis_cli.backbones` stays cheap: it imports neither torch nor transformers, and a
config can take DEFAULT_BACKBONE before any argument is checked.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from elvis_cli.util.errors import InputError, unknown_name

if TYPE_CHECKING:
    from elvis_cli.backbones.base import Backbone

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "Backbone",
    "ImageFeatures",
    "backbone_from_settings",
    "backbone_options",
    "check_backbone_name",
    "create_backbone",
    "select_top_k",
]

DEFAULT_BACKBONE = "efficientnet-lite0"
# What recorded settings that name no local_descriptors hold: the network's own local
# descriptors. EfficientNet-Lite records the option only for RootSIFT, its default, so its
# network files, and every file from before RootSIFT became the default, name none.
UNRECORDED_LOCAL_DESCRIPTORS = "network"


def _efficientnet_lite(name: str) -> Callable[..., Backbone]:
    def build(**options: Any) -> Backbone:
        from elvis_cli.backbones.efficientnet_lite import EfficientNetLiteBackbone

        return EfficientNetLiteBackbone(name.removeprefix("efficientnet-"), **options)

    return build


def _vit(module: str, class_name: str) -> Callable[..., Backbone]:
    def build(**options: Any) -> Backbone:
        backbone_class = getattr(importlib.import_module(f"elvis_cli.backbones.{module}"),
                                 class_name)
        return backbone_class(**options)

    return build


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "efficientnet-lite0": _efficientnet_lite("efficientnet-lite0"),
    "efficientnet-lite1": _efficientnet_lite("efficientnet-lite1"),
    "efficientnet-lite2": _efficientnet_lite("efficientnet-lite2"),
    "dinov2": _vit("dinov2", "DinoV2Backbone"),
    "dinov3": _vit("dinov3", "DinoV3Backbone"),
    "siglip2": _vit("siglip2", "Siglip2Backbone"),
}


def check_backbone_name(name: str) -> None:
    """Refuse an unknown backbone name, before anything heavy is imported (the configs)."""
    if name not in BACKBONES:
        raise unknown_name("backbone", name, BACKBONES)


def create_backbone(name: str = DEFAULT_BACKBONE, **options: Any) -> Backbone:
    """Instantiate a backbone by registry name, with its options as keywords."""
    check_backbone_name(name)
    return BACKBONES[name](**options)


def backbone_options(items: Iterable[str]) -> dict[str, Any]:
    """`--backbone-option` KEY=VALUE items as options: a value that reads as JSON (a number,
    true, a list) is that value, any other is its text."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--backbone-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def backbone_from_settings(settings: dict[str, Any]) -> Backbone:
    """Recreate the backbone a features file was extracted with, from its recorded settings."""
    options = dict(settings)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise InputError(f"backbone settings without a name: {settings!r}")
    if name.startswith("efficientnet-"):
        options.setdefault("local_descriptors", UNRECORDED_LOCAL_DESCRIPTORS)
    return create_backbone(name, **options)


def __getattr__(name: str) -> Any:
    """base.py's names, imported (with torch) when first asked for."""
    if name not in ("Backbone", "ImageFeatures", "select_top_k"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("elvis_cli.backbones.base"), name)
