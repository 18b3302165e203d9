"""Accuracy per class, before and after, from model predictions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .runtime import Runner
from .samples import SampleSet


def predict(
    runner: Runner, samples: SampleSet, indices: np.ndarray, scores_name: str
) -> np.ndarray:
    """Top-1 class `[len(indices)]` of every sample."""
    predictions = [
        np.argmax(outputs[0], axis=1)
        for _, outputs in runner.run(samples.load, indices, [scores_name])
    ]
    return np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Accuracy:
    """Per-class accuracy (percent) of one model on one labelled set."""

    per_class: dict[int, float]
    counts: dict[int, int]
    retain: float  # over every sample of a kept class
    forget: float  # over every sample of a forgotten class

    @classmethod
    def of(cls, labels: np.ndarray, predictions: np.ndarray, forget_classes: Sequence[int]):
        correct = labels == predictions
        classes = [int(c) for c in np.unique(labels)]
        forgotten = np.isin(labels, forget_classes)
        return cls(
            per_class={c: _percent(correct[labels == c]) for c in classes},
            counts={c: int(np.sum(labels == c)) for c in classes},
            retain=_percent(correct[~forgotten]),
            forget=_percent(correct[forgotten]),
        )


def _percent(hits: np.ndarray) -> float:
    return float(100.0 * hits.mean()) if len(hits) else float("nan")
