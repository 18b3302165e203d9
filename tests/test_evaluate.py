"""`evaluate` against a direct onnxruntime computation, and the membership attack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.special

import onnx_forget
from onnx_forget.metrics import membership_attack
from tests.helpers import HELD_OUT, MODEL, SAMPLES, run_model


def _direct_scores(path: Path, x: np.ndarray) -> np.ndarray:
    return run_model(path, x).astype(np.float64)


@pytest.fixture(scope="module")
def forgotten(tmp_path_factory) -> Path:
    """The CNN with class 3 forgotten (small sample counts: evaluation is the point)."""
    output = tmp_path_factory.mktemp("models") / "cnn-no3.onnx"
    onnx_forget.forget(MODEL, 3, SAMPLES, output=output, retain_per_class=30, forget_samples=60)
    return output


def test_evaluation_agrees_with_a_direct_onnxruntime_computation(forgotten):
    with np.load(HELD_OUT) as archive:
        x, y = archive["x"], archive["y"]
    evaluation = onnx_forget.evaluate(forgotten, HELD_OUT, reference=MODEL)
    assert evaluation.forgotten_classes == [3]  # read from the model's metadata
    new, original = _direct_scores(forgotten, x), _direct_scores(MODEL, x)
    predictions = np.argmax(new, axis=1)
    for label in range(10):
        expected = 100 * np.mean(predictions[y == label] == label)
        assert evaluation.accuracy.per_class[label] == pytest.approx(expected)
    where, counts = np.unique(predictions[y == 3], return_counts=True)
    assert evaluation.confusion == {3: dict(zip(where.tolist(), counts.tolist()))}
    kept = y != 3
    same = np.argmax(original[kept], 1) == predictions[kept]
    assert evaluation.agreement == pytest.approx(100 * same.mean())
    p, q = scipy.special.softmax(original[kept], 1), scipy.special.softmax(new[kept], 1)
    kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))
    assert evaluation.kl_divergence == pytest.approx(kl, rel=1e-6)


def test_membership_share_of_the_forgotten_class_drops(forgotten):
    """The original model is confident on class 3's training digits, as on other members;
    after forgetting, the attack no longer calls them members."""
    evaluation = onnx_forget.evaluate(forgotten, HELD_OUT, reference=MODEL, members=SAMPLES)
    assert evaluation.membership["reference"] > 50
    assert evaluation.membership["model"] < evaluation.membership["reference"] - 40


def test_membership_attack_separates_confident_from_unsure_samples():
    rng = np.random.default_rng(0)
    members = 1 - rng.uniform(0, 0.01, 200)
    non_members = rng.uniform(0.3, 0.9, 200)
    assert membership_attack(members, non_members, 1 - rng.uniform(0, 0.01, 50)) > 95
    assert membership_attack(members, non_members, rng.uniform(0.0, 0.5, 50)) < 5
