"""How well the forgotten classes can still be read from the features the head sees.

A model whose head alone stops predicting a class may still carry it in its features: a
new linear layer would read it back. A closed-form ridge probe, fitted and scored by
cross-validation on one labelled set, says how far the forgetting went (docs/method.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import scipy.linalg

from .integer_layers import dequantized
from .layer_scan import Layer
from .opened import OpenedModel
from .runtime import SampleRows
from .samples import SampleSet
from .taps import add_taps

PROBE_FOLDS = 5
PROBE_RIDGE = 1e-2  # the ridge penalty per fitted sample, on standardised features


@dataclass(frozen=True)
class Readability:
    """Out-of-fold accuracy (percent) of a linear probe on the head's input features."""

    forgotten: float  # of the forgotten classes' samples
    kept: float  # of the kept classes' samples
    chance: float  # 100 / the number of classes in the set
    samples: int


def scores_and_features(
    opened: OpenedModel, model: onnx.ModelProto, samples: SampleSet, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """`model`'s scores of the samples and, when its head is known, the head's input as
    features `[n, d]` (token-wise inputs averaged over their tokens), from one run.
    `model` is the opened one or a rewrite of it: the tensor names are the same."""
    head = opened.head()
    if head is None:
        return opened.scores(opened.runner(model), samples, indices), None
    layer, scores_name = head.layer, opened.signature.scores_name
    runner = opened.runner(add_taps(model, (layer,), scores_name))
    names = [output.name for output in runner.session.get_outputs()]
    scores, features = SampleRows(len(indices)), SampleRows(len(indices))
    for _, values in runner.run(samples.load, indices, names):
        named = dict(zip(names, values))
        scores.add(named[scores_name])
        features.add(head_features(layer, named))
    if not scores.filled:
        return np.zeros((0, 0)), None
    return scores.result(), features.result()


def head_features(layer: Layer, named: dict[str, np.ndarray]) -> np.ndarray:
    """The head `layer`'s input in a batch's named outputs, dequantized, `[n, d]`:
    token-wise inputs averaged over their tokens (in float64, kept in the inputs'
    precision, float32 at least)."""
    inputs = dequantized(named[layer.input], layer.input_dequantization, named)
    tokens = inputs.reshape(len(inputs), -1, inputs.shape[-1])
    return tokens.mean(axis=1, dtype=np.float64).astype(np.result_type(inputs.dtype, np.float32))


def readability(
    features: np.ndarray, labels: np.ndarray, forgotten: list[int], seed: int
) -> Readability | None:
    """Fit a one-hot ridge probe on all but one of PROBE_FOLDS class-stratified folds and
    label the held fold, for each fold; None without two classes or a forgotten sample."""
    classes = np.unique(labels)
    is_forgotten = np.isin(labels, forgotten)
    if len(classes) < 2 or not is_forgotten.any():
        return None
    fold = _stratified_folds(labels, seed)
    predicted = np.empty_like(labels)
    for number in range(PROBE_FOLDS):
        held = fold == number
        if held.any():
            weights, mean, scale, offset = _ridge_probe(features[~held], labels[~held], classes)
            probe_scores = ((features[held] - mean) / scale) @ weights + offset
            predicted[held] = classes[np.argmax(probe_scores, axis=1)]
    correct = predicted == labels
    return Readability(
        forgotten=float(100.0 * correct[is_forgotten].mean()),
        kept=float(100.0 * correct[~is_forgotten].mean()) if (~is_forgotten).any() else np.nan,
        chance=100.0 / len(classes),
        samples=len(labels),
    )


def _stratified_folds(labels: np.ndarray, seed: int) -> np.ndarray:
    """Each sample's fold: every class's samples dealt round-robin in a seeded order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (np.arange(len(members)) + rng.integers(PROBE_FOLDS)) % PROBE_FOLDS
    return fold


def _ridge_probe(features: np.ndarray, labels: np.ndarray, classes: np.ndarray):
    """Ridge weights from standardised features to centred one-hot targets, with the
    standardisation and the target mean; solved in whichever of the feature or sample
    space is smaller."""
    mean = features.mean(axis=0, dtype=np.float64)  # features may be float32
    scale = features.std(axis=0, dtype=np.float64)
    scale[scale == 0] = 1.0
    inputs = (features - mean) / scale
    targets = (labels[:, None] == classes[None, :]).astype(np.float64)
    offset = targets.mean(axis=0)
    targets -= offset
    penalty = PROBE_RIDGE * len(inputs)
    if inputs.shape[1] <= inputs.shape[0]:
        gram = inputs.T @ inputs + penalty * np.eye(inputs.shape[1])
        weights = scipy.linalg.solve(gram, inputs.T @ targets, assume_a="pos")
    else:
        gram = inputs @ inputs.T + penalty * np.eye(inputs.shape[0])
        weights = inputs.T @ scipy.linalg.solve(gram, targets, assume_a="pos")
    return weights, mean, scale, offset
