"""How deep the forgetting went: the linear probe's readability of the forgotten classes
from the head's input, and the agreement of samples whose class the samples leave out."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest

import onnx_forget
from onnx_forget.probe import readability
from tests.helpers import FIXTURES, HELD_OUT, MODEL, SAMPLES

FEW = {"retain_per_class": 30, "forget_samples": 30, "device": "cpu"}


def _clusters(seed: int, separated: bool) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of 40 points in 6 dimensions; class 2's points are either a cluster of
    their own or drawn like class 0's (then no probe can tell them apart)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, (3, 6))
    if not separated:
        centres[2] = centres[0]
    labels = np.repeat(np.arange(3), 40)
    return centres[labels] + rng.normal(0.0, 1.0, (120, 6)), labels


def test_the_probe_reads_a_separate_class_and_not_a_hidden_one():
    readable = readability(*_clusters(0, separated=True), forgotten=[2], seed=0)
    hidden = readability(*_clusters(0, separated=False), forgotten=[2], seed=0)
    assert readable.forgotten == 100.0 and readable.chance == pytest.approx(100 / 3)
    assert hidden.forgotten < 75.0  # a coin flip between two identical clusters


def test_the_probe_solves_in_the_smaller_space_with_the_same_result():
    """Zero features change nothing but the shape: past the sample count they send the
    solve to the sample space, which must give the same out-of-fold labels."""
    features, labels = _clusters(1, separated=True)
    features[:, 3:] *= 0.2  # classes not trivially apart, so the labels are a real check
    padded = np.hstack([features, np.zeros((len(features), 200))])
    assert padded.shape[1] > len(features)
    assert readability(features, labels, [2], 0) == readability(padded, labels, [2], 0)


def test_forget_reports_the_probe_and_agreement_on_held_out_samples(tmp_path):
    result = onnx_forget.forget(
        MODEL, 3, SAMPLES, eval_samples=HELD_OUT, output=tmp_path / "out.onnx", **FEW
    )
    probe = result.report.probe
    assert probe["set"] == "eval"
    assert probe["before"]["forgotten"] >= 90.0  # the original model reads its own class
    assert probe["before"]["chance"] == 10.0 and probe["before"]["samples"] == 1000
    held_out = result.report.comparisons[-1]
    assert held_out.agreement >= 98.0
    assert held_out.uncovered is None  # the samples cover every class
    document = result.report.to_dict()
    assert document["probe"]["after"]["forgotten"] == probe["after"]["forgotten"]
    assert "linear probe on the head's input" in result.report.format()


def test_evaluate_reads_the_class_from_the_model_and_the_reference(tmp_path):
    """The CNN retrained without class 3 never learned it, yet a probe of its features
    still reads it: where forgetting in the features should land."""
    evaluation = onnx_forget.evaluate(
        FIXTURES / "mnist_cnn_without_3.onnx", HELD_OUT, reference=MODEL, forget_classes=[3]
    )
    assert evaluation.accuracy.forget == 0.0
    assert set(evaluation.probe) == {"model", "reference"}
    assert evaluation.probe["reference"].forgotten > evaluation.probe["model"].forgotten


@pytest.mark.parametrize("model", ["mnist_cnn_qop.onnx", "mnist_vit.onnx"])
def test_the_probe_reads_quantized_and_token_wise_heads(model):
    evaluation = onnx_forget.evaluate(FIXTURES / model, HELD_OUT, forget_classes=[3])
    assert evaluation.probe["model"].forgotten >= 90.0


def test_agreement_of_samples_whose_top_1_the_samples_leave_out(tmp_path):
    """Samples of classes 0-4 only: held-out samples of the kept classes whose original
    top-1 is 5-9 are counted apart, as onnxruntime's own scores say."""
    covered = tmp_path / "samples"
    for label in range(5):
        shutil.copytree(SAMPLES / str(label), covered / str(label))
    result = onnx_forget.forget(
        MODEL, 3, covered, eval_samples=HELD_OUT, output=tmp_path / "out.onnx", **FEW
    )
    held = np.load(HELD_OUT)
    session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    original = np.argmax(session.run(None, {name: held["x"].astype(np.float32)})[0], axis=1)
    uncovered = (original >= 5) & (held["y"] != 3)
    figures = result.report.comparisons[-1].uncovered
    assert figures["samples"] == int(uncovered.sum()) > 400
    assert 0.0 <= figures["agreement"] <= 100.0
    assert result.report.to_dict()["accuracy"]["eval"]["uncovered"] == figures
