"""Test-wide settings: one torch thread keeps tests deterministic and immune to a busy machine."""

import torch

torch.set_num_threads(1)


# A DINOv2-with-registers of the real architecture, small enough to run in milliseconds.
TINY_DINOV2 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64, "patch_size": 14, "image_size": 56,
               "num_register_tokens": 4}

# DINOv3 ViT and SigLIP2 NaFlex vision towers of the real architectures, equally tiny.
TINY_DINOV3 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64, "patch_size": 16, "image_size": 64,
               "num_register_tokens": 4}
TINY_SIGLIP2 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 64, "patch_size": 16, "num_patches": 16}
