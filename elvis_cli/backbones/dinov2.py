"""DINOv2 ViT-B/14 with registers: the backbone of the released ELViS models (ELVIS_SPEC §3)."""

from __future__ import annotations

from dataclasses import dataclass

from elvis_cli.backbones.vit import RegisterViTBackbone, ViTOptions


@dataclass
class DinoV2Options(ViTOptions):
    model_id: str = "facebook/dinov2-with-registers-base"


class DinoV2Backbone(RegisterViTBackbone):
    name = "dinov2"
    model_class = "Dinov2WithRegistersModel"
    options_type = DinoV2Options
