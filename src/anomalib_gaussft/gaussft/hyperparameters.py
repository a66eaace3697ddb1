"""GaussFT's options: their allowed values and one check that names the parameter, its value and the range."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any, Literal

import timm
from jsonargparse.typing import (  # noqa: F401 - re-exported: the types of GaussFT's signature
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
)

from .pseudo_anomalies import PSEUDO_ANOMALIES


class MapGaussian(str, Enum):
    """How the heatmap Gaussians are shared over feature-map positions."""

    SHARED = "shared"  # one Gaussian per level for all positions: small, shift-invariant (textures)
    PER_POSITION = "per_position"  # PaDiM-style, one Gaussian per level and position (aligned objects)
    REGIONAL = "regional"  # one Gaussian per level and image region (a map_regions × map_regions grid)


class ImageScore(str, Enum):
    """How the image-level anomaly score is computed."""

    GAUSSIAN_AD = "gaussian_ad"  # the paper's: Σ over levels of the pooled-feature Mahalanobis distance
    MAP_MAX = "map_max"  # maximum of the (neighbourhood-averaged) anomaly map
    LOCAL = "local"  # z(layout distance) + z(mean of the map's top 1 %), z-scored on held-out normals
    COMBINED = "combined"  # z(the paper's pooled score) + the two "local" terms: for unaligned surfaces


class LossDistance(str, Enum):
    """Distance of the fine-tuning loss."""

    MAHALANOBIS = "mahalanobis"  # the paper's: distance to the induced Gaussian
    EUCLIDEAN = "euclidean"  # ablation: a center loss, no whitening


class LossFeatures(str, Enum):
    """Which features the fine-tuning loss pulls toward their Gaussians."""

    POOLED = "pooled"  # the paper's: the pooled features of the image-score levels
    LOCAL = "local"  # what the local image score reads: every map position (its region's Gaussian) and the layout


class LossGaussian(str, Enum):
    """Which Gaussians the fine-tuning loss measures a training image against."""

    CROSS_FIT = "cross_fit"  # fitted on the other half of the training images: out-of-sample distances
    IN_SAMPLE = "in_sample"  # fitted on all training images, the scored one included


# Option types of GaussFT's signature: anomalib's CLI (jsonargparse) checks them while parsing and reports a bad
# value in a few lines (key, value, restriction) before anything runs.
MapGaussianName = Literal["shared", "per_position", "regional"]
ImageScoreName = Literal["gaussian_ad", "map_max", "local", "combined"]
LossDistanceName = Literal["mahalanobis", "euclidean"]
LossGaussianName = Literal["cross_fit", "in_sample"]
LossFeaturesName = Literal["pooled", "local"]
PseudoAnomalyName = Literal["mixup", "cutmix", "cutout", "augmix"]
LayoutGridCount = Literal[1, 2]
LrScheduleName = Literal["warmup_cosine", "constant"]
WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)

# Options of the torch model that fix what its statistics mean (with the backbone and input size, below).
STATISTICS_KEYS = (
    "levels",
    "map_levels",
    "map_gaussian",
    "map_regions",
    "map_neighbourhood",
    "map_detail_levels",
    "map_layout",
    "score_layout_map",
    "image_score",
    "layout_grids",
)
ARCHITECTURE_KEYS = ("backbone", "image_size", *STATISTICS_KEYS)
# Architecture keys added after checkpoints were first written: the value every older checkpoint was made with.
ARCHITECTURE_LEGACY = {
    "map_neighbourhood": 1,
    "map_detail_levels": [],
    "map_layout": False,
    "score_layout_map": False,
    "layout_grids": 1,
}

DEFAULT_INPUT = ((224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # timm's ImageNet defaults


def _choice(enum: type[Enum]) -> tuple[str, Any]:
    values = [member.value for member in enum]
    return f"one of {values}", lambda value: value in values


def _is_int(value: Any, low: int) -> bool:  # noqa: ANN401
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:  # noqa: ANN401
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unit_numbers(value: Any) -> bool:  # noqa: ANN401
    return not isinstance(value, str) and len(value) > 0 and all(_is_number(a) and 0 <= a <= 1 for a in value)


# name → (allowed range in words, check); every check sees the raw constructor value.
RULES: dict[str, tuple[str, Any]] = {
    "map_gaussian": _choice(MapGaussian),
    "image_score": _choice(ImageScore),
    "loss_distance": _choice(LossDistance),
    "loss_gaussian": _choice(LossGaussian),
    "loss_features": _choice(LossFeatures),
    "map_regions": ("an integer ≥ 1 (regions per side of the image)", lambda v: _is_int(v, 1)),
    "map_neighbourhood": (
        "an odd integer ≥ 1 (side of the neighbourhood averaged; 1 = none)",
        lambda v: _is_int(v, 1) and v % 2 == 1,
    ),
    "map_layout": ("null, true or false", lambda v: v is None or isinstance(v, bool)),
    "score_layout_map": ("null, true or false", lambda v: v is None or isinstance(v, bool)),
    "layout_grids": ("1 or 2 (pooling grids of the layout term)", lambda v: _is_int(v, 1) and v <= 2),
    "fine_tune_epochs": ("an integer ≥ 0 (0 = the frozen Gaussian AD)", lambda v: _is_int(v, 0)),
    "learning_rate": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "weight_decay": ("a number ≥ 0", lambda v: _is_number(v) and v >= 0),
    "held_out_fraction": ("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1),
    "patience": ("null or an integer ≥ 1", lambda v: v is None or _is_int(v, 1)),
    "lr_schedule": ("one of ['warmup_cosine', 'constant']", lambda v: v in ("warmup_cosine", "constant")),
    "wise_alphas": (
        "null or a non-empty list of numbers in [0, 1]",
        lambda v: (
            v is None or (not isinstance(v, str) and len(v) > 0 and all(_is_number(a) and 0 <= a <= 1 for a in v))
        ),
    ),
    "sigma": ("a number ≥ 0 (0 = no blur)", lambda v: _is_number(v) and v >= 0),
    "seed": ("an integer ≥ 0", lambda v: _is_int(v, 0)),
    "false_alarm_rate": ("null or a number in (0, 1)", lambda v: v is None or (_is_number(v) and 0 < v < 1)),
    "pseudo_anomalies": (
        f"a non-empty list drawn from {list(PSEUDO_ANOMALIES)}",
        lambda v: not isinstance(v, str) and len(list(v)) > 0 and set(v) <= set(PSEUDO_ANOMALIES),
    ),
}


def check_hyperparameters(values: dict[str, Any]) -> None:
    """Raise one ``ValueError`` naming every invalid option, its value and what is allowed."""
    problems = [
        f"{name}={values[name]!r} is invalid: allowed is {allowed}."
        for name, (allowed, ok) in RULES.items()
        if name in values and not ok(values[name])
    ]
    if problems:
        raise ValueError("Invalid GaussFT configuration:\n  " + "\n  ".join(problems))


def backbone_input_config(backbone: str) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """Native input size, mean and std of a timm backbone's pretrained weights (timm's data config)."""
    name = backbone.split(".")[0]
    if not timm.is_model(name):
        return DEFAULT_INPUT
    config = timm.data.resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg(backbone).to_dict())
    return tuple(config["input_size"][1:]), tuple(config["mean"]), tuple(config["std"])


def as_image_size(image_size: int | Sequence[int] | None, backbone: str) -> tuple[int, int]:
    """``image_size`` as ``(height, width)``; ``None`` gives the backbone's native size."""
    if image_size is None:
        return backbone_input_config(backbone)[0]
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(not _is_int(s, 1) for s in size):
        msg = f"image_size={image_size!r} is invalid: allowed is a positive int or [height, width]."
        raise ValueError(msg)
    return int(size[0]), int(size[1])


def plain(value: Any) -> Any:  # noqa: ANN401
    """``value`` with jsonargparse's restricted ints/floats as plain ``int``/``float``, containers recursively.

    Checkpoints load with ``weights_only=True``, which refuses other classes.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def same_value(first: Any, second: Any) -> bool:  # noqa: ANN401
    """Compare hyperparameters by value (checkpoints store tuples as lists)."""

    def plain(value: Any) -> Any:  # noqa: ANN401
        return [plain(v) for v in value] if isinstance(value, list | tuple) else value

    return plain(first) == plain(second)
