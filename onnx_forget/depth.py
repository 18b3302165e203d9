"""How deep to project: every layer, the last N counted from the head, or (`auto`) the
deepest set that keeps the kept classes' top-1 predictions on validation samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layer_scan import Layer
from .metrics import agreement
from .opened import OpenedModel
from .options import ALL_LAYERS as ALL
from .samples import SampleSet

# docs/method.md: the share of kept-class validation samples (percent) that must keep
# their original top-1 class for a depth to be taken.
AGREEMENT_TARGET = 99.0


@dataclass(frozen=True)
class DepthChoice:
    """The layers projected, each depth tried with what it kept, and why the search
    stopped (for a depth given by the user: that it was given)."""

    layers: tuple[Layer, ...]
    trials: tuple[dict, ...]  # depth, agreement, forget: one per depth tried
    reason: str

    def to_dict(self, total: int) -> dict:
        return {
            "projected": len(self.layers),
            "of": total,
            "trials": list(self.trials),
            "stopped": self.reason,
        }


def last_layers(opened: OpenedModel, depth: str | int) -> tuple[Layer, ...]:
    """The last `depth` projectable layers in graph order (every one for `all`)."""
    layers = opened.scan.layers
    return layers if depth == ALL else layers[-min(int(depth), len(layers)) :]


def depths_to_try(count: int) -> list[int]:
    """1, 2, 4, ... and `count`: each a pass over the validation samples."""
    depths, depth = [], 1
    while depth < count:
        depths.append(depth)
        depth *= 2
    return [*depths, count]


def choose_depth(
    opened: OpenedModel,
    build,
    classes: list[int],
    validation: SampleSet,
    indices: np.ndarray,
) -> DepthChoice:
    """Extend the projected layers from the head towards the input while the kept classes'
    validation samples keep their original top-1 (at least AGREEMENT_TARGET percent).

    `build(layers)` is the model projected on `layers` with its head refitted; each depth
    costs one pass of it over the validation samples.
    """
    labels = validation.labels[indices]
    kept = ~np.isin(labels, classes)
    original = opened.scores(opened.runner(opened.loaded.proto), validation, indices)
    trials, chosen = [], opened.scan.layers[-1:]
    reason = "every layer kept the agreement"
    for depth in depths_to_try(len(opened.scan.layers)):
        layers = last_layers(opened, depth)
        scores = opened.scores(opened.runner(build(layers)), validation, indices)
        kept_share = agreement(scores[kept], original[kept])
        forgotten = np.argmax(scores[~kept], axis=1) == labels[~kept]
        forget = float(100.0 * forgotten.mean()) if len(forgotten) else float("nan")
        trials.append({"depth": depth, "agreement": kept_share, "forget": forget})
        if kept_share < AGREEMENT_TARGET:
            chosen = layers if depth == 1 else chosen  # the head at least is projected
            reason = (
                f"agreement {kept_share:.1f}% < {AGREEMENT_TARGET:g}% at depth {depth}; "
                f"took depth {len(chosen)}"
            )
            break
        chosen = layers
    return DepthChoice(chosen, tuple(trials), reason)
