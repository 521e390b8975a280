"""DINOv2 ViT-B/14 with registers: the backbone of the released ELViS models (ELVIS_SPEC §3).

Weights come from the HuggingFace hub (downloaded once, then cached); transformers is imported
only here, when a DINOv2 backbone is actually created. Without a learned detector a patch's
weight is its cosine similarity to the class token. With the detector, descriptors are the
detector's projected features (1x1 conv + BatchNorm), as in the official AMES/ELViS extraction.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elvis_cli.backbones.base import (
    Backbone,
    ImageFeatures,
    grid_centres,
    parse_options,
    resize_to_multiple,
    select_top_k,
)
from elvis_cli.errors import InputError, ModelMismatchError, OfflineError

DETECTOR_URL = "http://ptak.felk.cvut.cz/personal/sumapave/public/ames/networks/{name}_detector.pt"
OFFICIAL_DETECTOR = "official"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DinoV2Options:
    model_id: str = "facebook/dinov2-with-registers-base"
    image_size: int = 768  # longer side before rounding each side to a multiple of the patch size
    num_local: int = 700  # the official files keep 700; ELViS reads the first 600
    detector: str | None = None  # None (class-token similarity), a .pt path, or "official"


def elvis_cache_dir() -> Path:
    """Where downloaded model files live: $ELVIS_CACHE, else ~/.cache/elvis."""
    return Path(os.environ.get("ELVIS_CACHE", Path.home() / ".cache" / "elvis")).expanduser()


class Detector(nn.Module):
    """The learned local-feature detector: 1x1 conv, BatchNorm, ReLU, 1x1 conv, softplus."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, 1, 1)

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, h, w) -> projected features (B, D, h, w) and weights (B, h, w)."""
        projected = self.bn(self.conv1(feature_map))
        weights = F.softplus(self.conv2(F.relu(projected)))
        return projected, weights[:, 0]


def detector_file(detector: str, backbone: str = "dinov2") -> Path:
    """A detector path as given, or the official one downloaded once into the cache."""
    if detector != OFFICIAL_DETECTOR:
        path = Path(detector).expanduser()
        if not path.is_file():
            raise InputError(f"detector file not found: {path}")
        return path
    target = elvis_cache_dir() / "detectors" / f"{backbone}_detector.pt"
    if not target.is_file():
        url = DETECTOR_URL.format(name=backbone)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:  # downloads to a temporary name and renames, so a broken download leaves nothing
            torch.hub.download_url_to_file(url, str(target), progress=False)
        except OSError as error:
            raise OfflineError(
                f"could not download the {backbone} detector from {url} ({error}); "
                "run without --detector or put the file in place by hand"
            ) from None
    return target


def load_detector(detector: str, dim: int) -> Detector:
    path = detector_file(detector)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means an unusable file
        raise InputError(f"{path}: not a detector checkpoint ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("state"), dict):
        state = state["state"]
    module = Detector(dim)
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ModelMismatchError(
            f"{path}: detector does not fit a {dim}-dim backbone ({str(error).splitlines()[0]})"
        ) from None
    return module.eval()


def load_dinov2(model_id: str) -> nn.Module:
    """from_pretrained with the hub cache; no network (or HF_HUB_OFFLINE) -> OfflineError."""
    from transformers import Dinov2WithRegistersModel

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Dinov2WithRegistersModel.from_pretrained(model_id, local_files_only=offline).eval()
    except (OSError, ValueError) as error:
        raise OfflineError(
            f"could not fetch the DINOv2 weights {model_id!r} ({str(error).splitlines()[0]}); "
            "the default backbone efficientnet-lite0 works offline"
        ) from None


class DinoV2Backbone(Backbone):
    """Class token as global descriptor, the top-weighted patch tokens as local descriptors."""

    name = "dinov2"

    def __init__(self, model: Any = None, **options: Any) -> None:
        """`model`: a Dinov2WithRegistersModel or its config, used instead of the hub weights."""
        super().__init__()
        self.options: DinoV2Options = parse_options(DinoV2Options, options, self.name)
        if model is None:
            model = load_dinov2(self.options.model_id)
        else:
            if not isinstance(model, nn.Module):
                from transformers import Dinov2WithRegistersModel

                model = Dinov2WithRegistersModel(model)
            if "model_id" not in options:  # record what was used, not the hub default
                source = getattr(model.config, "_name_or_path", "") or "custom"
                self.options = dataclasses.replace(self.options, model_id=source)
        self.model = model.eval()
        config = self.model.config
        self.patch_size = int(config.patch_size)
        self.num_registers = int(config.num_register_tokens)
        self.local_dim = self.global_dim = int(config.hidden_size)
        self.num_local = self.options.num_local
        self.detector = (
            load_detector(self.options.detector, self.local_dim) if self.options.detector else None
        )

    def settings(self) -> dict[str, Any]:
        settings = {"name": self.name, **dataclasses.asdict(self.options)}
        if self.options.detector not in (None, OFFICIAL_DETECTOR):
            settings["detector"] = str(Path(self.options.detector).expanduser().resolve())
        return settings

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        tensor = resize_to_multiple(image, self.options.image_size, self.patch_size)
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        return (tensor - mean) / std

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        grid_h, grid_w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        tokens = self.model(pixel_values=images).last_hidden_state  # after the final norm
        cls = tokens[:, 0]
        patches = tokens[:, 1 + self.num_registers :]
        if self.detector is None:
            weights = F.normalize(patches, dim=-1) @ F.normalize(cls, dim=-1)[..., None]
            local, weights = patches, weights[..., 0]
        else:
            feature_map = patches.transpose(1, 2).reshape(len(images), -1, grid_h, grid_w)
            projected, weights = self.detector(feature_map)
            local, weights = projected.flatten(2).transpose(1, 2), weights.flatten(1)
        xy = grid_centres(grid_h, grid_w).to(images.device)
        desc, meta = select_top_k(local, weights, xy, self.num_local)
        return ImageFeatures(F.normalize(cls.float(), dim=-1), desc, meta)
