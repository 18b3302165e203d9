"""Closed-form repair of the classifier head after the projection (ours, not the paper's).

The projection removes the forgotten class's directions from every layer, and with them
some of what the kept classes used. The repair refits only the last fully connected layer,
by ridge least squares, from the projected model's own penultimate features to the
original model's logits: kept-class samples keep their original logits, and forgotten
samples get theirs with the forgotten classes' logits moved below the sample's lowest.
The ridge pulls towards the projected head, not towards zero: feature directions the
samples never reach (classes without samples, on a 1000-class model) keep the projected
weights. No gradient, no loop: one more forward pass and one `[K + 1, K + 1]` solve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import scipy.linalg

from .errors import UnsupportedModelError
from .integer_layers import dequantized, run_time_quantization
from .layer_scan import OUT_IN, Head
from .rewrite import WEIGHT_INPUT, WeightEditor, bias_of
from .taps import add_taps

if TYPE_CHECKING:
    from .opened import OpenedModel
    from .passes import FitSamples

# Ridge strength relative to the mean feature energy (trace / K): enough to keep the solve
# well-posed when features outnumber samples, small enough not to bias the fit.
RIDGE = 1e-3
# How far below a forgotten sample's lowest logit its forgotten classes' logits are put,
# as a share of the sample's logit range.
MARGIN = 0.1


def forget_targets(logits: np.ndarray, forget_classes: list[int]) -> np.ndarray:
    """Original logits `[n, C]` with the forgotten classes pushed below each row's minimum."""
    targets = logits.astype(np.float64).copy()
    low, high = targets.min(axis=1), targets.max(axis=1)
    targets[:, forget_classes] = (low - MARGIN * (high - low))[:, None]
    return targets


class HeadSystem:
    """The ridge normal equations `[F 1]^T [F 1] x = [F 1]^T T`, summed batch by batch."""

    def __init__(self, features: int, classes: int, with_bias: bool):
        size = features + int(with_bias)
        self.with_bias = with_bias
        self.gram = np.zeros((size, size))
        self.cross = np.zeros((size, classes))

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        """`features` `[n, K]` of the projected model, `targets` `[n, C]`."""
        rows = features.reshape(len(targets), -1).astype(np.float64)
        if self.with_bias:
            rows = np.hstack([rows, np.ones((len(rows), 1))])
        self.gram += rows.T @ rows
        self.cross += rows.T @ targets

    def solve(
        self, prior_weight: np.ndarray, prior_bias: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Weight `[K, C]` and bias `[C]` (None without a bias) minimising
        `|[F 1] x - T|^2 + |sqrt(penalty) (x - prior)|^2`; the bias is not penalised."""
        if not (np.isfinite(self.gram).all() and np.isfinite(self.cross).all()):
            raise UnsupportedModelError(
                "the classifier head's inputs or logits hold NaN or Inf on these samples; "
                "check the model's weights"
            )
        features = len(self.gram) - int(self.with_bias)
        penalty = np.zeros(len(self.gram))
        penalty[:features] = RIDGE * max(np.trace(self.gram[:features, :features]), 1e-30)
        penalty[:features] /= features
        prior = prior_weight if prior_bias is None else np.vstack([prior_weight, prior_bias])
        solution = scipy.linalg.solve(
            self.gram + np.diag(penalty), self.cross + penalty[:, None] * prior, assume_a="pos"
        )
        return solution[:features], (solution[features] if self.with_bias else None)


def write_head(
    model: onnx.ModelProto, head: Head, system: HeadSystem
) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` whose head is `system`'s solution, pulled towards its own weights;
    and how many quantized channels of the head needed a larger scale."""
    editor = WeightEditor(model)
    seen = editor.seen(head.layer.weight)
    prior_bias = None if head.bias is None else editor.seen(head.bias).reshape(-1)
    weight, bias = system.solve(seen.T if head.layer.orientation == OUT_IN else seen, prior_bias)
    oriented = weight.T if head.layer.orientation == OUT_IN else weight
    editor.edit(head.layer.weight, head.layer.node, WEIGHT_INPUT, head.layer.shared,
                lambda _: oriented, bias_of(head.layer))  # fmt: skip
    if bias is not None:
        editor.edit(head.bias, head.bias_node, head.bias_input, head.bias_shared,
                    lambda seen: bias.reshape(seen.shape))  # fmt: skip
    return editor.finish({}), editor.rescaled_channels


def repair_head(
    opened: OpenedModel, model: onnx.ModelProto, fit: FitSamples, classes: list[int]
) -> tuple[onnx.ModelProto, int]:
    """The projected `model` with its head refitted on the fit samples: one run of them
    through `model` for the head's input features, then one solve. Also the quantized
    channels of the head that needed a larger scale."""
    head = opened.head(model)
    count = opened.signature.class_count
    runner = opened.runner(add_taps(model, (head.layer,), opened.signature.scores_name))
    targets = fit.head_logits.astype(np.float64)  # a copy: the logits serve every α tried
    forgotten = np.isin(fit.labels, classes)
    targets[forgotten] = forget_targets(targets[forgotten], classes)
    system = HeadSystem(head.layer.input_size, count, head.bias is not None)
    done = 0
    names = [head.layer.input, *run_time_quantization(head.layer.input_dequantization)]
    for batch, values in runner.run(fit.samples.load, fit.indices, names):
        tapped = dict(zip(names, values))
        features = dequantized(tapped[head.layer.input], head.layer.input_dequantization, tapped)
        system.add(features.reshape(-1, head.layer.input_size), targets[done : done + len(batch)])
        done += len(batch)
    return write_head(model, head, system)
