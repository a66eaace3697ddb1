"""Constants fixed on held-out normals after the fit: the image score's z-scores and the fused map's scales."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from .image_score import TERMS
from .map_fusion import LAYOUT_TAIL_Z, TAIL_QUANTILE, MapFusion

if TYPE_CHECKING:
    from .torch_model import GaussFTModel

logger = logging.getLogger(__name__)


@torch.no_grad()
def normalise_on_held_out(
    model: GaussFTModel,
    loader: Iterable[Any],
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    refit: bool,
) -> None:
    """Fix the score normalisation and the map fusion from the held-out normals; with ``refit``, then refit.

    ``model`` must be fitted with its accumulated statistics kept (``fit(keep_statistics=True)``) when ``refit``:
    the held-out images' moments are added to them and all Gaussians are fitted again, so no image is wasted.
    When the image score reads the layout map (``score_layout_map``), its terms need the fusion's constants: a
    second pass over the held-out images computes them once the fusion is fitted (keeping their maps instead
    would grow with the held-out set).
    """
    terms = []
    fusion = model.map_fusion
    second_pass = model.normalised_score and model.score_layout_map
    if fusion is not None:
        fusion.reset()
    for item in model.iter_features(loader, transform):
        averaged = model.averaged_map(item.features, item.images.shape[-2:])
        if model.normalised_score and not second_pass:
            terms.append(model.score_terms(item.features, averaged))
        if fusion is not None:
            fusion.update(averaged, *model.fused_maps(item.features, item.images.shape[-2:]))
        if refit:
            model.accumulate(item.features)  # moments only: the Gaussians scoring the second pass stay as fitted
    if fusion is not None:
        _fit_map_fusion(fusion)
    if second_pass:
        for item in model.iter_features(loader, transform):
            size = item.images.shape[-2:]
            layout = model.upsampled_layout_map(item.features, size)  # the score never reads the detail map
            terms.append(model.score_terms(item.features, model.averaged_map(item.features, size), None, layout))
    if model.normalised_score:
        _fit_score_normalisation(model, torch.cat(terms))
    if refit:
        model.fit()


def _fit_map_fusion(fusion: MapFusion) -> None:
    fusion.fit()
    scales = ", ".join(f"{name} centre {centre:.3g}, scale {scale:.3g}" for name, centre, scale in fusion.constants)
    if fusion.layout:
        gate, cap = float(fusion.layout_gate), float(fusion.layout_weight_cap)
        scales += f"; layout excess weighted by min({cap:.3g}, {gate:.3g} / image max of the local maps)"
    logger.info(
        "Map fusion from held-out normals (scale = q%g - median; layout map: %.3g std above the mean): %s.",
        100 * TAIL_QUANTILE,
        LAYOUT_TAIL_Z,
        scales,
    )


def _fit_score_normalisation(model: GaussFTModel, terms: torch.Tensor) -> None:
    model.score_normalisation.fit(terms)
    normalisation = model.score_normalisation
    summary = zip(TERMS[model.image_score.value], normalisation.mean.tolist(), normalisation.std.tolist(), strict=True)
    described = ", ".join(f"{name} {mean:.3g} ± {std:.3g}" for name, mean, std in summary)
    logger.info("Image-score normalisation from %d held-out normals: %s.", len(terms), described)
