"""DINOv3 ViT-B/16, the backbone of `dinov3_elvis_gld`: DINOv2's recipe with patch size 16."""

from __future__ import annotations

from dataclasses import dataclass

from elvis_cli.backbones.vit import RegisterViTBackbone, ViTOptions


@dataclass
class DinoV3Options(ViTOptions):
    model_id: str = "facebook/dinov3-vitb16-pretrain-lvd1689m"


class DinoV3Backbone(RegisterViTBackbone):
    name = "dinov3"
    model_class = "DINOv3ViTModel"
    options_type = DinoV3Options
