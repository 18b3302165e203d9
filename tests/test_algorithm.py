"""The projected weights against a plain numpy reading of the paper's method (docs/method.md)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import scipy.linalg

import onnx_forget
from onnx_forget.gram import Vectors
from onnx_forget.layer_scan import scan_layers
from onnx_forget.rewrite import rewrite_model
from onnx_forget.subspace import SpacePair
from tests import models

ALPHA_R, ALPHA_F = 100.0, 3.0
FORGET_CLASS = 1
TOLERANCE = 1e-6


def reference_conv_patches(x: np.ndarray, weight_shape, pads, strides, dilations, groups):
    """Every receptive field, by explicit loops: `[groups, d, N * positions]`."""
    _, per_group, kh, kw = weight_shape
    padded = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    height = (padded.shape[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    width = (padded.shape[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    columns = [[] for _ in range(groups)]
    for n in range(x.shape[0]):
        for i in range(height):
            for j in range(width):
                for g in range(groups):
                    patch = np.empty((per_group, kh, kw))
                    for c in range(per_group):
                        for a in range(kh):
                            for b in range(kw):
                                row = i * strides[0] + a * dilations[0]
                                col = j * strides[1] + b * dilations[1]
                                patch[c, a, b] = padded[n, g * per_group + c, row, col]
                    columns[g].append(patch.ravel())
    return np.stack([np.array(c).T for c in columns]), (height, width)


def reference_conv(x, weight, bias, pads, strides, dilations, groups):
    patches, (height, width) = reference_conv_patches(
        x, weight.shape, pads, strides, dilations, groups
    )
    per_out = weight.shape[0] // groups
    outputs = []
    for g in range(groups):
        w = weight[g * per_out : (g + 1) * per_out].reshape(per_out, -1)
        outputs.append(w @ patches[g])  # [per_out, N * positions]
    y = np.concatenate(outputs).reshape(weight.shape[0], x.shape[0], height, width)
    return y.transpose(1, 0, 2, 3) + bias[None, :, None, None]


def reference_activations(x: np.ndarray, w: dict) -> dict[str, np.ndarray]:
    """Each layer's input vectors as a `[d, N]` matrix (conv: per group), in float64."""
    groups = models.conv_groups(w)
    w = {k: v.astype(np.float64) for k, v in w.items()}
    geometry = (models.CONV_PADS, models.CONV_STRIDES, models.CONV_DILATIONS, groups)
    conv_columns, _ = reference_conv_patches(x, w["conv_w"].shape, *geometry)
    conv = reference_conv(x, w["conv_w"], w["conv_b"], *geometry)
    tokens = np.maximum(conv, 0).reshape(len(x), 6, 20)
    mm = np.maximum(tokens @ w["matmul_w"], 0)
    flat = mm.reshape(len(x), -1)
    g1 = np.maximum(flat @ w["gemm1_w"].T + w["gemm1_b"], 0)
    return {
        "conv": conv_columns,
        "matmul": tokens.reshape(-1, 20).T,
        "gemm1": flat.T,
        "gemm2": g1.T,
    }


def reference_projection(retain: np.ndarray, forget: np.ndarray) -> np.ndarray:
    """The paper's steps 2-3 (docs/method.md) from whole activation matrices, with an SVD."""

    def importance(activations, alpha):
        u, s, _ = scipy.linalg.svd(activations, full_matrices=True)
        energy = np.zeros(len(u))
        energy[: len(s)] = s**2 / np.sum(s**2)
        scaled = alpha * energy / ((alpha - 1) * energy + 1)
        return u @ np.diag(scaled) @ u.T

    m_r, m_f = importance(retain, ALPHA_R), importance(forget, ALPHA_F)
    return np.eye(len(m_r)) - (m_f - m_f @ m_r)


def reference_weights(x, labels, weights) -> dict[str, np.ndarray]:
    """The paper's step 4 (docs/method.md) on every layer's weight in its stored orientation."""
    retain = reference_activations(x[labels != FORGET_CLASS], weights)
    forget = reference_activations(x[labels == FORGET_CLASS], weights)
    conv_w = weights["conv_w"].astype(np.float64)
    groups = models.conv_groups(weights)
    per_out = conv_w.shape[0] // groups
    conv_new = np.concatenate(
        [
            conv_w[g * per_out : (g + 1) * per_out].reshape(per_out, -1)
            @ reference_projection(retain["conv"][g], forget["conv"][g]).T
            for g in range(groups)
        ]
    ).reshape(conv_w.shape)
    return {
        "conv_w": conv_new,
        "matmul_w": reference_projection(retain["matmul"], forget["matmul"]) @ weights["matmul_w"],
        "gemm1_w": weights["gemm1_w"] @ reference_projection(retain["gemm1"], forget["gemm1"]).T,
        "gemm2_w": reference_projection(retain["gemm2"], forget["gemm2"]) @ weights["gemm2_w"],
    }


def stored_weights(model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("groups", [1, 2])
def test_projected_weights_match_plain_numpy_reference(groups):
    """Every weight kind, every patch, equals the SVD reference to 1e-6 relative (a
    one-group conv's patches are summed in another order than its weight's inputs)."""
    rng = np.random.default_rng(0)
    weights = models.mixed_weights(groups=groups)
    x = rng.normal(size=(24, *models.MIXED_INPUT)).astype(np.float32)
    labels = np.arange(24) % models.MIXED_CLASSES
    result = onnx_forget.forget(
        models.mixed_model(weights),
        FORGET_CLASS,
        (x, labels),
        max_patches=0,
        method="paper",
        alpha_r=ALPHA_R,
        alpha_f=ALPHA_F,
        retain_per_class=1000,
        forget_samples=1000,
        batch_size=5,
    )
    assert len(result.report.layers) == 4
    expected = reference_weights(x.astype(np.float64), labels, weights)
    got = stored_weights(result.model)
    for name, reference in expected.items():
        difference = np.max(np.abs(got[name] - reference)) / np.max(np.abs(reference))
        assert difference <= TOLERANCE, (name, difference)
        assert np.max(np.abs(got[name] - weights[name])) > 1e-3, name  # it did project
    for name in ("conv_b", "gemm1_b", "shape"):
        assert got[name].tobytes() == stored_weights(models.mixed_model(weights))[name].tobytes()


def test_identity_projection_leaves_every_weight_bit_identical():
    """With P = I the rewrite must not perturb a single bit of any tensor."""
    model = models.mixed_model(models.mixed_weights())
    scan = scan_layers(model)
    identity = {
        layer.statistic_key: np.stack([np.eye(layer.input_size)] * layer.groups)
        for layer in scan.layers
    }
    rewritten, copies, _ = rewrite_model(model, scan.layers, models.by_matrix(identity), {})
    assert copies == []
    assert [t.SerializeToString() for t in rewritten.graph.initializer] == [
        t.SerializeToString() for t in model.graph.initializer
    ]


def _eigen_importance(gram: np.ndarray, alpha: float) -> np.ndarray:
    """The paper's `M = U diag(lambda) U^T` from an eigendecomposition of `G`."""
    values, vectors = np.linalg.eigh(gram)
    total = values.clip(0).sum()
    energy = values.clip(0) / total if total > 0 else np.zeros_like(values)
    return vectors @ np.diag(alpha * energy / ((alpha - 1) * energy + 1)) @ vectors.T


@pytest.mark.parametrize("empty", [None, "retain", "forget"])
def test_factored_projection_equals_the_eigendecomposition(empty):
    """The Cholesky form of `P` equals `I - (M_f - M_f M_r)` built from eigenvectors, for
    rank-deficient Gram matrices, several α (below 1, at 1 and next to it, where `M` goes
    through `G`, and either side of that band) and all-zero inputs (M = 0), from the
    lower triangles alone; and the same from the vectors themselves (`Vectors`, factored
    through `n x n` products), alone or beside a Gram matrix."""
    rng = np.random.default_rng(3)
    d = 12
    activations = {
        name: rng.normal(size=(d, rank)) for name, rank in (("retain", 7), ("forget", 3))
    }
    if empty:
        activations[empty] = np.zeros((d, 0))
    grams = {name: a @ a.T for name, a in activations.items()}
    vectors = {name: Vectors(a.T) for name, a in activations.items()}
    for alpha_r, alpha_f in ((100, 3), (0.5, 10), (1, 1), (1 + 1e-9, 1 - 1e-4), (1.002, 0.998)):
        m_r = _eigen_importance(grams["retain"], alpha_r)
        m_f = _eigen_importance(grams["forget"], alpha_f)
        expected = np.eye(d) - (m_f - m_f @ m_r)
        pair = SpacePair(grams["retain"][None], grams["forget"][None])
        got = pair.projection(alpha_r, alpha_f)(np.eye(d)[None])[0]
        assert np.max(np.abs(got - expected)) <= 1e-10, (alpha_r, alpha_f)
        # M depends on the energies alone: activations of any scale, subnormal ones too.
        tiny = SpacePair(grams["retain"][None] * 1e-310, grams["forget"][None] * 1e-310)
        got = tiny.projection(alpha_r, alpha_f)(np.eye(d)[None])[0]
        assert np.max(np.abs(got - expected)) <= 1e-10, (alpha_r, alpha_f, "subnormal")
        # Only the lower triangles are read: the accumulated sums keep no more.
        junk = np.triu(rng.normal(size=(d, d)), 1)
        lower = SpacePair(*((np.tril(grams[name]) + junk)[None] for name in ("retain", "forget")))
        got = lower.projection(alpha_r, alpha_f)(np.eye(d)[None])[0]
        assert np.max(np.abs(got - expected)) <= 1e-10, (alpha_r, alpha_f, "lower triangle")
        for retain, forget in (
            (vectors["retain"], vectors["forget"]),
            (vectors["retain"], grams["forget"][None]),
            (Vectors(vectors["retain"].rows * 1e-160), Vectors(vectors["forget"].rows * 1e-160)),
        ):
            got = SpacePair(retain, forget).projection(alpha_r, alpha_f)(np.eye(d)[None])[0]
            assert np.max(np.abs(got - expected)) <= 1e-10, (alpha_r, alpha_f, "vectors")


def test_a_wide_factor_equals_the_eigendecomposition():
    """Past SMALL_PAGES_FROM the factor's lower triangle is written block by block into
    small pages (here 800 wide: four blocks, the last one partial); junk in the sums'
    upper triangles is never read."""
    rng = np.random.default_rng(4)
    d = 800
    grams = {}
    for name, rank in (("retain", 300), ("forget", 100)):
        activations = rng.normal(size=(d, rank))
        grams[name] = activations @ activations.T
    expected = np.eye(d) - (
        _eigen_importance(grams["forget"], ALPHA_F)
        - _eigen_importance(grams["forget"], ALPHA_F) @ _eigen_importance(grams["retain"], ALPHA_R)
    )
    junk = np.triu(rng.normal(size=(d, d)), 1)
    pair = SpacePair(*((np.tril(grams[name]) + junk)[None] for name in ("retain", "forget")))
    got = pair.projection(ALPHA_R, ALPHA_F)(np.eye(d)[None])[0]
    assert np.max(np.abs(got - expected)) <= 1e-10
