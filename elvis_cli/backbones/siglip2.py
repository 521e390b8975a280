"""SigLIP2 ViT-B/16, the backbone of `siglip2_elvis_gld`.

The NaFlex vision tower takes images of any aspect ratio as a sequence of flattened patches
with their grid shape, so the paper's resize-to-a-multiple recipe applies unchanged. SigLIP2
has no class token: its attention-pooled output is the global descriptor and stands in for the
class token when patches are weighted without a detector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elvis_cli.backbones.vit import ViTBackbone, ViTOptions


@dataclass
class Siglip2Options(ViTOptions):
    model_id: str = "google/siglip2-base-patch16-naflex"


class Siglip2Backbone(ViTBackbone):
    name = "siglip2"
    model_class = "Siglip2VisionModel"
    options_type = Siglip2Options
    mean = std = (0.5, 0.5, 0.5)

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels, height, width = images.shape
        p = self.patch_size
        grid_h, grid_w = height // p, width // p
        # (B, C, H, W) -> (B, h * w, p * p * C): row-major patches, channels last inside a patch
        patches = images.reshape(batch, channels, grid_h, p, grid_w, p)
        patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, -1)
        output = self.model(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(batch, grid_h * grid_w, dtype=torch.long,
                                            device=images.device),
            spatial_shapes=torch.tensor([[grid_h, grid_w]] * batch, device=images.device),
        )
        return output.pooler_output, output.last_hidden_state  # both after the final norm
