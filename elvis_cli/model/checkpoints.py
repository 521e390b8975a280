"""ELViS and AMES checkpoints: official ones by name (downloaded once into the cache), the
bundled one of the offline backbone, or any file in the official format (ELVIS_SPEC §2). Which
model a file holds is read from its state dict (AMES has a match token, `mtc_token`).

Checkpoints are loaded weights-only: a file from the internet can hold tensors and plain
containers, never code.
"""

import math
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from elvis_cli.backbones import UNRECORDED_LOCAL_DESCRIPTORS
from elvis_cli.model.ames import Ames, AmesConfig
from elvis_cli.model.elvis import Elvis, ElvisConfig
from elvis_cli.model.fusion import Fusion
from elvis_cli.model.reranker import PAPER_NUM_LOCAL
from elvis_cli.util.atomic import atomic_path
from elvis_cli.util.download import cache_dir, download_to_cache
from elvis_cli.util.errors import InputError, ModelMismatchError, unknown_name
from elvis_cli.util.file_kind import FileKind, describe_file, file_kind

# the authors' server: elvis/networks/ for ELViS, ames/networks/ for AMES
OFFICIAL_CHECKPOINT_URL = ("http://ptak.felk.cvut.cz/personal/sumapave/public/{architecture}/"
                           "networks/{name}.pt")


@dataclass(frozen=True)
class OfficialCheckpoint:
    backbone: str  # the backbone whose features it was trained on
    architecture: str = "elvis"  # the re-ranker (registry name) whose weights it holds
    lam: float = 0.5  # the authors' fusion for it: the ELViS paper's 0.5/0.5, AMES's README's
    temperature: float = 0.5  # values tuned on GLDv2's public test split


# official name -> what it is; the "dist" AMES take binarised input (ITQ, 128 bits) and hold
# their own fine-tuned ITQ projection (remap_local.0.W), so itq_<backbone>_D128.pt, the
# projection they started from, is not needed to use them
OFFICIAL_CHECKPOINTS = {
    "dinov2_elvis_gld": OfficialCheckpoint("dinov2"),
    "dinov3_elvis_gld": OfficialCheckpoint("dinov3"),
    "siglip2_elvis_gld": OfficialCheckpoint("siglip2"),
    "dinov2_elvis_sop": OfficialCheckpoint("dinov2"),
    "dinov2_ames": OfficialCheckpoint("dinov2", "ames", 0.55, 0.30),
    "dinov2_ames_dist": OfficialCheckpoint("dinov2", "ames", 0.35, 0.10),
    "cvnet_ames": OfficialCheckpoint("cvnet", "ames", 0.85, 0.80),
    "cvnet_ames_dist": OfficialCheckpoint("cvnet", "ames", 0.65, 0.20),
}

# architecture (registry name) -> how messages name it
MODEL_NAMES = {"elvis": "ELViS", "ames": "AMES"}

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


@dataclass(frozen=True)
class BundledCheckpoint:
    """A checkpoint shipped inside the package, trained with `elvis train`."""

    file: str  # in WEIGHTS_DIR
    backbone: dict[str, Any]  # the descriptor space (_DESCRIPTOR_SPACE_KEYS) it was trained on
    architecture: str = "elvis"
    num_local: int = PAPER_NUM_LOCAL  # local descriptors per image it scores by default
    # the fusion it is used with, where validation at its default features and num_local
    # chose another than the one its training stored (None: the stored one)
    fusion: Fusion | None = None


_LITE0 = {"name": "efficientnet-lite0", "local_layer": 7}
_LITE0_ROOTSIFT = {"name": "efficientnet-lite0", "local_descriptors": "rootsift"}
# name -> checkpoint; a features file's default is the first one of its descriptor space
BUNDLED_CHECKPOINTS = {
    "efficientnet-lite0": BundledCheckpoint("efficientnet_lite0_elvis.pt", _LITE0),
    "efficientnet-lite0-ames": BundledCheckpoint("efficientnet_lite0_ames.pt", _LITE0, "ames"),
    # trained on SIFT at 448 px and all keypoints, used on the default's 320 px at 300 of
    # them, where validation (benchmarks/validate_checkpoints.py) chose temperature 0.02
    "efficientnet-lite0-rootsift": BundledCheckpoint(
        "efficientnet_lite0_rootsift_elvis.pt", _LITE0_ROOTSIFT, num_local=300,
        fusion=Fusion(lam=0.5, temperature=0.02)),
}

# settings keys that change the descriptor space; the rest (image size, K) do not
_DESCRIPTOR_SPACE_KEYS = ("name", "variant", "model_id", "local_layer", "local_descriptors")
# what settings that do not record a key have
_SPACE_DEFAULTS = {"local_descriptors": UNRECORDED_LOCAL_DESCRIPTORS}


@dataclass
class Checkpoint:
    model: Elvis | Ames
    name: str
    backbone: dict[str, Any] | None  # settings of the backbone it was trained on, when known
    fusion: Fusion = field(default_factory=Fusion)
    info: dict[str, Any] = field(default_factory=dict)  # training record of our checkpoints
    num_local: int = PAPER_NUM_LOCAL  # local descriptors per image it scores by default

    @property
    def descriptor_dim(self) -> int:
        return self.model.config.descriptor_dim

    @property
    def architecture(self) -> str:
        """The re-ranker (registry name) whose weights it holds."""
        return "ames" if isinstance(self.model, Ames) else "elvis"


def load_checkpoint(name_or_path: str | Path) -> Checkpoint:
    """A checkpoint by official name, bundled backbone name, or path."""
    text = str(name_or_path)
    official = OFFICIAL_CHECKPOINTS.get(text)
    if official is not None:
        path = _download_official(text, official.architecture)
        return _from_file(path, text, {"name": official.backbone},
                          Fusion(official.lam, official.temperature))
    bundled = BUNDLED_CHECKPOINTS.get(text)
    if bundled is not None:
        loaded = _from_file(WEIGHTS_DIR / bundled.file, text, bundled.backbone)
        loaded.num_local = bundled.num_local
        loaded.fusion = bundled.fusion or loaded.fusion
        return loaded
    path = Path(text).expanduser()
    if not path.exists():
        raise unknown_name("checkpoint (no such file either)", text, _checkpoint_names())
    return _from_file(path, path.stem, None)


def default_checkpoint_for(backbone: dict[str, Any] | None, architecture: str = "elvis") -> str:
    """The `architecture` checkpoint that matches a features file's backbone: the bundled one
    of its descriptor space, else the first official one listed for it (float input, not
    "dist")."""
    name = (backbone or {}).get("name")
    for checkpoint, bundled in BUNDLED_CHECKPOINTS.items():
        if bundled.architecture == architecture and backbone is not None \
                and _same_space(bundled.backbone, backbone):
            return checkpoint
    for checkpoint, official in OFFICIAL_CHECKPOINTS.items():
        if official.backbone == name and official.architecture == architecture:
            return checkpoint
    model = "" if architecture == "elvis" else f"{MODEL_NAMES[architecture]} "
    raise InputError(f"no default {model}checkpoint for features of "
                     f"{describe_backbone(backbone)}: pass --checkpoint NAME|PATH")


def checkpoint_for_features(checkpoint: "str | Path | Checkpoint | None",
                            backbone: dict[str, Any] | None, dim: int,
                            binarised: bool = False, architecture: str = "elvis") -> Checkpoint:
    """An `architecture` checkpoint (loaded, or by name or path; None: the one matching the
    features' backbone), checked against the features."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint or default_checkpoint_for(backbone, architecture))
    if checkpoint.architecture != architecture:
        raise ModelMismatchError(
            f"checkpoint {checkpoint.name!r} holds {MODEL_NAMES[checkpoint.architecture]} "
            f"weights, not {MODEL_NAMES[architecture]}'s: use --model {checkpoint.architecture} "
            "or another --checkpoint")
    check_compatible(checkpoint, backbone, dim, binarised)
    return checkpoint


def check_compatible(checkpoint: Checkpoint, backbone: dict[str, Any] | None, dim: int,
                     binarised: bool = False) -> None:
    """Refuse features from another backbone or of another dimension, naming both sides.

    `binarised` features (sign bits of a released binarised file) need a binarised checkpoint
    with as many bits; float features suit either kind, a binarised one binarises them itself.
    """
    config = checkpoint.model.config
    if binarised:
        if not config.binarised:
            raise ModelMismatchError(
                f"the features are binarised ({dim} bits) but checkpoint {checkpoint.name!r} "
                "is not: use a binarised checkpoint (one with remap_local.0.W, the ITQ "
                "projection) or the float descriptor files")
        if dim != config.model_dim:
            raise ModelMismatchError(
                f"checkpoint {checkpoint.name!r} expects {config.model_dim}-bit binarised "
                f"descriptors but the features have {dim} bits")
    elif dim != checkpoint.descriptor_dim:
        raise ModelMismatchError(
            f"checkpoint {checkpoint.name!r} expects {checkpoint.descriptor_dim}-d descriptors "
            f"but the features are {dim}-d ({describe_backbone(backbone)})"
        )
    if backbone is None or checkpoint.backbone is None:
        return  # official descriptor files do not record their backbone
    if not _same_space(checkpoint.backbone, backbone):
        raise ModelMismatchError(
            f"checkpoint {checkpoint.name!r} was trained on "
            f"{describe_backbone(checkpoint.backbone)} features, but these features come from "
            f"{describe_backbone(backbone)}"
        )


def describe_backbone(settings: dict[str, Any] | None) -> str:
    if not settings:
        return "an unrecorded backbone"
    return " ".join(f"{value}" if key == "name" else f"{key}={value}"
                    for key, value in _descriptor_space(settings).items())


def save_checkpoint(
    path: Path,
    model: Elvis | Ames,
    backbone: dict[str, Any] | None,
    fusion: Fusion,
    info: dict[str, Any] | None = None,
) -> None:
    """Write the official format plus our metadata under `elvis_cli`, atomically."""
    payload = {
        "state": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "elvis_cli": {
            "backbone": backbone,
            "fusion": asdict(fusion),
            **({"sinkhorn_iterations": model.config.sinkhorn_iterations}
               if isinstance(model, Elvis) else {}),
            "info": info or {},
        },
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def _descriptor_space(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: settings[key] for key in _DESCRIPTOR_SPACE_KEYS if key in settings}


def _same_space(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Whether two backbones' settings agree on every descriptor-space key both record (or
    imply: _SPACE_DEFAULTS)."""
    ours, theirs = ({**_SPACE_DEFAULTS, **_descriptor_space(settings)}
                    for settings in (ours, theirs))
    return all(ours[key] == theirs[key] for key in ours.keys() & theirs.keys())


def _download_official(name: str, architecture: str) -> Path:
    return download_to_cache(OFFICIAL_CHECKPOINT_URL.format(architecture=architecture, name=name),
                             cache_dir() / "checkpoints" / f"{name}.pt", f"checkpoint {name!r}",
                             "pass --checkpoint PATH")


def _checkpoint_names() -> list[str]:
    return [*OFFICIAL_CHECKPOINTS, *BUNDLED_CHECKPOINTS]


def _not_a_checkpoint(path: Path) -> InputError:
    """What the file is, and what a checkpoint is, for a file that cannot be one; for a
    folder, the checkpoints it holds."""
    inside = sorted(str(child) for child in path.glob("*.pt")) if path.is_dir() else []
    hint = f" (it holds {', '.join(inside[:3])})" if inside else ""
    return InputError(
        f"checkpoint {path} is {describe_file(path)}{hint}, not an ELViS checkpoint: expected a "
        f".pt file written by `elvis train`, or the name of an official or bundled checkpoint "
        f"({', '.join(_checkpoint_names())})")


def _reason(error: BaseException) -> str:
    """The first line of an error's message, or its type when it has none (EOFError)."""
    lines = str(getattr(error, "reason", None) or error).strip().splitlines()
    return lines[0][:120] if lines else type(error).__name__


def _from_file(path: Path, name: str, backbone: dict[str, Any] | None,
               fusion: Fusion | None = None) -> Checkpoint:
    """The checkpoint in `path`; `fusion`: the fusion of a file that stores none (default:
    the ELViS paper's)."""
    # torch's unpickler, given an image or a text file, fails with "pop from empty list"
    kind = file_kind(path)
    if kind is FileKind.ZIP_DAMAGED:  # torch files are zip archives: a download cut short?
        raise InputError(f"cannot read checkpoint {path}: {kind.value}")
    if kind not in (FileKind.TORCH, FileKind.TORCH_LEGACY):
        raise _not_a_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # not a refused object: a damaged pickle
            raise InputError(f"cannot read checkpoint {path}: a damaged torch file "
                             f"({_reason(error.__context__ or error)})") from None
        raise InputError(
            f"refusing to load checkpoint {path}: it holds more than weights (code or custom "
            "objects), which weights-only loading does not execute"
        ) from None
    except Exception as error:  # a damaged torch file fails in many ways, all "unreadable"
        raise InputError(f"cannot read checkpoint {path}: a damaged torch file "
                         f"({_reason(error)})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
        raise InputError(f"checkpoint {path} is not in the official format (a dict with 'state')")
    state = payload["state"]
    model = _model_for_state(state, path)
    extra = payload.get("elvis_cli") or {}
    try:
        fusion = Fusion(**extra["fusion"]) if "fusion" in extra else fusion or Fusion()
    except (InputError, TypeError) as error:
        raise InputError(f"checkpoint {path} stores an unusable fusion: {error}") from None
    return Checkpoint(model.eval(), name, extra.get("backbone", backbone), fusion,
                      extra.get("info", {}))


def _config_for_state(state: dict[str, Any], path: Path) -> ElvisConfig | AmesConfig:
    """The model's sizes, read from the state dict: a match token makes it AMES, whose layers
    and feed-forward width are counted; the projection is plain (remap_local.0 is the Linear)
    or binarised (remap_local.0.W is the ITQ projection (D, 128), the authors'
    Matcher(binarized=True)) for both."""
    itq = state.get("remap_local.0.W")
    key = "remap_local.0.W" if itq is not None else "remap_local.0.weight"
    weight = state.get(key)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise InputError(f"checkpoint {path} has no 2-d '{key}'")
    dims, model_dim = weight.shape if itq is not None else weight.shape[::-1]
    sizes = {"descriptor_dim": dims, "model_dim": model_dim, "binarised": itq is not None}
    if "mtc_token" not in state:
        return ElvisConfig(**sizes)
    feedforward = state.get("decoder.layers.0.linear1.weight")
    if not isinstance(feedforward, torch.Tensor) or feedforward.ndim != 2:
        raise InputError(f"checkpoint {path} has no 2-d 'decoder.layers.0.linear1.weight'")
    layers = {key.split(".")[2] for key in state if key.startswith("decoder.layers.")}
    return AmesConfig(**sizes, layers=len(layers), feedforward_dim=feedforward.shape[0])


def _model_for_state(state: dict[str, Any], path: Path) -> Elvis | Ames:
    config = _config_for_state(state, path)
    model = Ames(config) if isinstance(config, AmesConfig) else Elvis(config)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:4])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:4])}" if unexpected else ""]
        details = "; ".join(part for part in parts if part)
        what = MODEL_NAMES["ames" if isinstance(model, Ames) else "elvis"]
        raise InputError(f"checkpoint {path} does not fit {what}: {details}")
    wrong = [key for key, value in expected.items() if state[key].shape != value.shape]
    if wrong:
        raise InputError(
            f"checkpoint {path} has wrongly shaped {wrong[0]}: "
            f"{tuple(state[wrong[0]].shape)} instead of {tuple(expected[wrong[0]].shape)}"
        )
    model.load_state_dict({key: value.float() for key, value in state.items()})
    if isinstance(model, Elvis) and not math.isfinite(model.dust_bin.item()):
        raise InputError(f"checkpoint {path} has a non-finite dust_bin")
    return model
