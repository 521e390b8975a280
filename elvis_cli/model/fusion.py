"""How a re-ranker's raw score and the global similarity make the final score (ELVIS_SPEC §5),
and the bounds of its two settings.

torch is not imported here: `lam` and `temperature` from the command line are checked by
`check_fusion` before any heavy import, so that a typo is answered at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elvis_cli.util.errors import InputError

if TYPE_CHECKING:
    import torch


def check_fusion(lam: float | None, temperature: float | None) -> None:
    """Refuse a fusion weight outside [0, 1] or a temperature that is not a positive number
    (None: the checkpoint's own); callers check before any work, so a typo costs nothing."""
    if lam is not None and not 0.0 <= lam <= 1.0:
        raise InputError(f"lam (--lam, the fusion weight of the global score) must lie in "
                         f"[0, 1], got {lam:g}")
    if temperature is not None and not 0.0 < temperature < math.inf:
        raise InputError(f"temperature (--temp, which scales the raw score before the sigmoid) "
                         f"must be a positive number, got {temperature:g}")


@dataclass
class Fusion:
    """score = lam * global + (1 - lam) * sigmoid(temperature * raw)."""

    lam: float = 0.5
    temperature: float = 0.5

    def __post_init__(self) -> None:
        check_fusion(self.lam, self.temperature)

    def __call__(self, global_score: torch.Tensor, raw_score: torch.Tensor) -> torch.Tensor:
        return self.lam * global_score + (1 - self.lam) * (self.temperature * raw_score).sigmoid()
