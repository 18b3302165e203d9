"""How a model does on labelled samples: accuracy, where forgotten samples go,
agreement with a reference model, and a membership-inference check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.special

from .runtime import Runner, SampleRows
from .samples import SampleSet

# Confidences are clipped away from 0 and 1 before the log-odds the attack reads.
CONFIDENCE_FLOOR = 1e-12


def class_scores(
    runner: Runner, samples: SampleSet, indices: np.ndarray, scores_name: str
) -> np.ndarray:
    """The model's scores output `[len(indices), classes]` for the given samples."""
    scores = SampleRows(len(indices))
    for _, outputs in runner.run(samples.load, indices, [scores_name]):
        scores.add(outputs[0])
    return scores.result()


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Class probabilities in float64: the scores themselves when they already are, else
    softmax (a float32 confidence near 1 would round to 1 and its log-odds to infinity)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) and np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        return scores
    return scipy.special.softmax(scores, axis=1)


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


def confusion(
    labels: np.ndarray, predictions: np.ndarray, forget_classes: Sequence[int]
) -> dict[int, dict[int, int]]:
    """For each forgotten class, how many of its samples each class now receives."""
    where = {}
    for label in forget_classes:
        predicted, counts = np.unique(predictions[labels == label], return_counts=True)
        where[int(label)] = {int(p): int(n) for p, n in zip(predicted, counts)}
    return where


def agreement(scores: np.ndarray, reference: np.ndarray) -> float:
    """Share (percent) of samples whose top-1 class is the reference model's."""
    same = np.argmax(scores, axis=1) == np.argmax(reference, axis=1)
    return _percent(same)


def mean_kl_divergence(scores: np.ndarray, reference: np.ndarray) -> float:
    """Mean `KL(reference || model)` between the two models' class distributions."""
    p = np.clip(probabilities(reference), CONFIDENCE_FLOOR, 1.0)
    q = np.clip(probabilities(scores), CONFIDENCE_FLOOR, 1.0)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))) if len(p) else float("nan")


def true_class_confidence(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The probability each sample's own class gets, `[n]`."""
    return probabilities(scores)[np.arange(len(labels)), labels]


def _log_odds(confidence: np.ndarray) -> np.ndarray:
    clipped = np.clip(confidence, CONFIDENCE_FLOOR, 1.0 - CONFIDENCE_FLOOR)
    return np.log(clipped) - np.log1p(-clipped)


def membership_attack(members: np.ndarray, non_members: np.ndarray, targets: np.ndarray) -> float:
    """Share (percent) of `targets` a membership classifier calls members.

    The classifier is a logistic regression on the log-odds of the true-class confidence,
    fitted on `members` (samples the model was trained on) against `non_members`
    (held-out samples), each side weighted to count equally. For a model that never saw
    the targets this share is what it calls held-out samples: near chance.
    """
    if not (len(members) and len(non_members) and len(targets)):
        return float("nan")
    x = np.concatenate([_log_odds(members), _log_odds(non_members)])
    y = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    weight = np.where(y == 1, 0.5 / len(members), 0.5 / len(non_members))
    scale = max(float(np.std(x)), 1.0)

    def loss(theta):
        logits = theta[0] * x / scale + theta[1]
        # log(1 + e^z) - y z is the logistic loss; logaddexp keeps it finite.
        value = np.sum(weight * (np.logaddexp(0.0, logits) - y * logits))
        residual = weight * (scipy.special.expit(logits) - y)
        return value, np.array([np.sum(residual * x / scale), np.sum(residual)])

    # Members are at least as confident as non-members: the premise of the attack. Without
    # that bound a noisy fit could read "less confident" as "member" and call every
    # forgotten sample a member.
    fitted = scipy.optimize.minimize(
        loss, np.zeros(2), jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)]
    )
    called = fitted.x[0] * _log_odds(targets) / scale + fitted.x[1] > 0
    return _percent(called)


def membership_share(
    member_scores: np.ndarray,
    member_labels: np.ndarray,
    held_scores: np.ndarray,
    held_labels: np.ndarray,
    classes: Sequence[int],
) -> float:
    """The attack's member share of the forgotten classes' training samples: fitted on
    the kept classes' members against their held-out samples."""
    member_kept = ~np.isin(member_labels, classes)
    held_kept = ~np.isin(held_labels, classes)
    return membership_attack(
        true_class_confidence(member_scores[member_kept], member_labels[member_kept]),
        true_class_confidence(held_scores[held_kept], held_labels[held_kept]),
        true_class_confidence(member_scores[~member_kept], member_labels[~member_kept]),
    )
