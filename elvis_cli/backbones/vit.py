"""What the paper's ViT backbones share (ELVIS_SPEC §3): hub weights through transformers,
resizing to multiples of the patch size, last-layer normalised patch tokens, the learned
detector (the default) or class-token weighting, the three global descriptors, top-K selection.

DINOv2, DINOv3 and SigLIP2 differ only in their transformers class, normalisation and how
their tokens are laid out; each subclass says just that. transformers is imported only when
one of them is created.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elvis_cli.backbones.base import (
    CLASS_GLOBAL,
    Backbone,
    ImageFeatures,
    grid_centres,
    parse_options,
    resize_to_multiple,
    select_top_k,
)
from elvis_cli.util.download import cache_dir, download_to_cache, offline_forced, reachable
from elvis_cli.util.errors import InputError, ModelMismatchError, OfflineError
from elvis_cli.util.file_kind import FileKind, describe_file, file_kind

DETECTOR_URL = "http://ptak.felk.cvut.cz/personal/sumapave/public/ames/networks/{name}_detector.pt"
OFFICIAL_DETECTOR = "official"
NO_DETECTOR = "none"
NORM_EPS = 1e-15  # the authors' epsilon for the class token, patch tokens and detector features
WEIGHTED_GLOBALS = ("w-avg", "og-avg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ViTOptions:
    model_id: str = ""  # each backbone sets its hub default
    image_size: int = 768  # longer side before rounding each side to a multiple of the patch size
    num_local: int = 700  # the official files keep 700; ELViS reads the first 600
    # "official" (the authors' detector of this backbone, downloaded once), a .pt path, or
    # "none" (weights by similarity to the class token)
    detector: str = OFFICIAL_DETECTOR


class Detector(nn.Module):
    """The authors' learned detector (SpatialAttention2d): 1x1 conv, BatchNorm, ReLU, 1x1 conv,
    softplus. It weights the patches; the patch tokens themselves are what gets stored."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, 1, 1)

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, h, w) -> L2-normalised BatchNorm output (B, D, h, w), the features the
        authors' "w-avg" global averages, and the weights (B, 1, h, w)."""
        projected = self.bn(self.conv1(feature_map))
        weights = F.softplus(self.conv2(F.relu(projected)))
        return F.normalize(projected, dim=1, eps=NORM_EPS), weights


def detector_file(detector: str, backbone: str) -> Path:
    """A detector path as given, or the backbone's official one downloaded once into the cache."""
    if detector != OFFICIAL_DETECTOR:
        path = Path(detector).expanduser()
        if not path.exists():
            raise InputError(f"detector file not found: {path}")
        if file_kind(path) not in (FileKind.TORCH, FileKind.TORCH_LEGACY):
            raise InputError(f"detector {path} is {describe_file(path)}, not a detector: expected "
                             f"a .pt state dict like the authors' {backbone}_detector.pt, "
                             f"`{OFFICIAL_DETECTOR}` or `{NO_DETECTOR}`")
        return path
    return download_to_cache(
        DETECTOR_URL.format(name=backbone),
        cache_dir() / "detectors" / f"{backbone}_detector.pt",
        f"the {backbone} detector",
        f"use --backbone-option detector={NO_DETECTOR} (weights by class-token similarity)",
    )


def load_detector(detector: str, dim: int, backbone: str) -> Detector:
    path = detector_file(detector, backbone)
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


def load_hub_model(class_name: str, model_id: str, backbone: str) -> nn.Module:
    """from_pretrained with the hub cache, or from a local folder. Without network (the hub
    host not reachable within seconds, or HF_HUB_OFFLINE/ELVIS_OFFLINE set) only the cache is
    read: the hub client itself would retry for half a minute before failing."""
    import huggingface_hub
    import huggingface_hub.constants as hub

    offline_mode = hub.is_offline_mode() or offline_forced() or os.environ.get(
        "HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    no_network = not Path(model_id).expanduser().is_dir() and (
        offline_mode or not reachable(hub.ENDPOINT))
    why = "offline mode is on" if offline_mode else (
        f"{urllib.parse.urlsplit(hub.ENDPOINT).hostname} cannot be reached")
    not_cached = OfflineError(
        f"the {backbone} weights {model_id!r} are not in the Hugging Face cache "
        f"({hub.HF_HUB_CACHE}) and {why}: run once with network (they are then cached), set "
        "HF_HOME to a Hugging Face cache that holds them, or pass --backbone-option "
        "model_id=FOLDER (a copy saved by save_pretrained); the default backbone "
        "efficientnet-lite0 works offline")
    # said before transformers' seconds of imports when not even the config is cached
    if no_network and not isinstance(
            huggingface_hub.try_to_load_from_cache(model_id, "config.json"), str):
        raise not_cached
    import transformers

    model_class = getattr(transformers, class_name)
    try:
        return model_class.from_pretrained(model_id, local_files_only=no_network).eval()
    except (OSError, ValueError) as error:
        if no_network:
            raise not_cached from None
        raise OfflineError(
            f"could not fetch the weights {model_id!r} ({str(error).splitlines()[0]}); "
            "the default backbone efficientnet-lite0 works offline"
        ) from None


class ViTBackbone(Backbone):
    """A global token as global descriptor, the top-weighted patch tokens as local descriptors.

    Follows the authors' extract/extract.py step by step (one scale), so the stored numbers are
    theirs up to floating-point summation order.
    """

    global_types = (CLASS_GLOBAL, *WEIGHTED_GLOBALS)

    model_class: ClassVar[str]  # transformers class of the vision model
    options_type: ClassVar[type[ViTOptions]]
    mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, float, float]] = IMAGENET_STD

    def __init__(self, model: Any = None, **options: Any) -> None:
        """`model`: a model of `model_class` or its config, used instead of the hub weights."""
        super().__init__()
        self.options: ViTOptions = parse_options(self.options_type, options, self.name)
        if model is None:
            model = load_hub_model(self.model_class, self.options.model_id, self.name)
        else:
            if not isinstance(model, nn.Module):
                import transformers

                model = getattr(transformers, self.model_class)(model)
            if "model_id" not in options:  # record what was used, not the hub default
                source = getattr(model.config, "_name_or_path", "") or "custom"
                self.options = dataclasses.replace(self.options, model_id=source)
        self.model = model.eval()
        self.patch_size = int(self.model.config.patch_size)
        self.local_dim = self.global_dim = int(self.model.config.hidden_size)
        self.num_local = self.options.num_local
        self.detector = (
            None
            if self.options.detector in (None, NO_DETECTOR)
            else load_detector(self.options.detector, self.local_dim, self.name)
        )

    def settings(self) -> dict[str, Any]:
        settings = {"name": self.name, **dataclasses.asdict(self.options)}
        if self.options.detector not in (None, NO_DETECTOR, OFFICIAL_DETECTOR):
            settings["detector"] = str(Path(self.options.detector).expanduser().resolve())
        return settings

    def preprocess(self, image: np.ndarray, reference_side: int | None = None) -> torch.Tensor:
        tensor = resize_to_multiple(image, self.options.image_size, self.patch_size,
                                    reference_side)
        mean = torch.tensor(self.mean)[:, None, None]
        std = torch.tensor(self.std)[:, None, None]
        return (tensor - mean) / std

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        grid_h, grid_w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        cls, patches = self.tokens(images)
        cls = F.normalize(cls.float(), dim=-1, eps=NORM_EPS)
        # (B, D, h, w) raw patch tokens, the layout the authors' code works in
        feats = patches.float().transpose(1, 2).reshape(len(images), -1, grid_h, grid_w)
        feats = feats.contiguous()
        if self.detector is None:
            w_feats = feats  # "w-avg" averages the raw tokens, "og-avg" the normalised ones
            feats = F.normalize(feats, dim=1, eps=NORM_EPS)
            weights = torch.einsum("bd,bdij->bij", cls, feats)[:, None]
        else:
            w_feats, weights = self.detector(feats)  # "og-avg" averages the raw tokens
        pooled = {"w-avg": _weighted_average(weights, w_feats),
                  "og-avg": _weighted_average(weights, feats)}
        local = F.normalize(feats, dim=1, eps=NORM_EPS).flatten(2).transpose(1, 2)
        centres = grid_centres(grid_h, grid_w).to(images.device)
        desc, meta = select_top_k(local, weights.flatten(1), centres, self.num_local)
        return ImageFeatures(_as_stored(cls), desc, meta,
                             {kind: _as_stored(value) for kind, value in pooled.items()})

    @abstractmethod
    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer, normalised (B, D) global token and (B, h * w, D) row-major patch tokens."""


def _weighted_average(weights: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean over positions of weight * feature, (B, D): the authors' pooling."""
    return F.normalize((weights * feats).mean((2, 3)), dim=-1)


def _as_stored(global_desc: torch.Tensor) -> torch.Tensor:
    """The authors average each global over the scales and L2-normalise again before storing;
    with one scale that is a second normalisation, kept so that the numbers are theirs."""
    return F.normalize(global_desc, dim=-1)


class RegisterViTBackbone(ViTBackbone):
    """DINO-style token layout: class token, register tokens, then the patches."""

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        registers = int(getattr(self.model.config, "num_register_tokens", 0))
        hidden = self.model(pixel_values=images).last_hidden_state  # after the final norm
        return hidden[:, 0], hidden[:, 1 + registers :]
