"""`elvis explain`, one call: a pair's explanation or a checkpoint's curves, drawn and written.

Outputs are checked before any work (a bad path never costs the extraction and transport) and
written atomically: the PNG, the SVG beside it on request, the JSON of the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from elvis_cli.explanation.curves import (
    CheckpointCurves,
    draw_checkpoint_curves,
    explain_checkpoint,
)
from elvis_cli.explanation.figures import checked_picture
from elvis_cli.explanation.pair import PairExplanation, draw_pair_explanation, explain_pair
from elvis_cli.model.fusion import check_fusion
from elvis_cli.retrieval.config import RerankConfig
from elvis_cli.util.atomic import writable_output, write_text_atomic
from elvis_cli.util.errors import InputError


@dataclass
class ExplainRun:
    """What `elvis explain` explained (a pair, or a checkpoint's curves) and where it went."""

    pair: PairExplanation | None
    curves: CheckpointCurves | None
    picture: Path
    svg: Path | None
    json: Path | None


def explain_files(query: str | Path | int | None = None,
                  gallery: str | Path | int | None = None, *,
                  features: str | Path | None = None,
                  gallery_features: str | Path | None = None,
                  checkpoint: str | Path | None = None, lam: float | None = None,
                  temperature: float | None = None,
                  num_local: int | None = RerankConfig.num_local, device: str = "cpu",
                  output: str | Path = "explain.png", svg: bool = False,
                  json_output: str | Path | None = None,
                  allow_external_sources: bool = False) -> ExplainRun:
    """With `query` and `gallery`: why ELViS scored the pair as it did (explain_pair), drawn
    to `output`. With neither: the learned f and g of `checkpoint` (explain_checkpoint), with
    `features` a benchmark's features file whose pairs' votes are drawn beneath them.
    `svg` also writes the picture as SVG beside it; `json_output` the numbers as JSON."""
    if (query is None) != (gallery is None):
        raise InputError("give two images, QUERY and GALLERY, or none for the checkpoint's "
                         "f and g")
    check_fusion(lam, temperature)
    picture = checked_picture(output)
    numbers = None if json_output is None else writable_output(json_output, (".json",))
    pair = curves = None
    if query is not None:
        pair = explain_pair(query, gallery, features=features,
                            gallery_features=gallery_features, checkpoint=checkpoint,
                            device=device, lam=lam, temperature=temperature,
                            num_local=num_local, allow_external_sources=allow_external_sources)
        draw_pair_explanation(pair, picture, svg=svg)
    else:
        if gallery_features is not None or lam is not None or temperature is not None:
            raise InputError("--gallery-features, --lam and --temp are for a pair: give QUERY "
                             "and GALLERY")
        curves = explain_checkpoint(checkpoint, features=features, device=device,
                                    num_local=num_local)
        draw_checkpoint_curves(curves, picture, svg=svg)
    if numbers is not None:
        write_text_atomic(numbers, json.dumps((pair or curves).to_json(), indent=1))
    return ExplainRun(pair, curves, picture, picture.with_suffix(".svg") if svg else None,
                      numbers)
