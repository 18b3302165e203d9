"""Streaming Gram matrices against float64 references: any batch size, sets kept as their
vectors, and the BLAS update whatever the layout of the sum it is given."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_forget.gram import GramAccumulator, Vectors, numpy_gram_update
from onnx_forget.layer_scan import scan_layers
from tests import models

WIDTH = 64


def _fully_connected_layer(width: int = WIDTH):
    """The one MatMul layer of a `[N, width] @ [width, 3]` model."""
    weight = np.zeros((width, 3), np.float32)
    model = models.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weight, "w")],
    )
    (layer,) = scan_layers(model).layers
    return layer


@pytest.mark.parametrize(
    ("batch", "tolerance", "width", "count"),
    [
        (1, 1e-7, WIDTH, 3000),
        (7, 1e-7, WIDTH, 3000),
        (300, 1e-6, 800, 6000),
        (512, 1e-6, WIDTH, 3000),
        (512, 1e-6, 1100, 3000),
    ],
)
def test_gram_agrees_with_float64_at_any_batch_size(batch, tolerance, width, count):
    """A set of many small batches sums in float64 batch by batch (a batch of fewer than
    FLOAT64_PRODUCT_BELOW vectors even makes its product in float64), so small batches are
    no less accurate than one float32 product of many rows (against an exact float64 sum; a
    float32 sum over every batch of one vector measured 1.7e-6 here). Batches of 300 over
    800 wide add float32 products into a float64 total triangle by triangle; 800 and 1100
    wide, the sums (float64, then one float32 run) are large enough for small pages."""
    rows = np.maximum(np.random.default_rng(0).normal(size=(count, width)) + 0.5, 0)
    rows = rows.astype(np.float32)
    layer = _fully_connected_layer(width)
    accumulator = GramAccumulator(layer, np.zeros(len(rows), int), 0, (0, 0))
    for start in range(0, len(rows), batch):
        accumulator.add(rows[start : start + batch], start)
    exact = rows.astype(np.float64).T @ rows.astype(np.float64)
    difference = np.abs(accumulator.gram[0] - exact).max() / np.abs(exact).max()
    assert difference <= tolerance, difference
    assert accumulator.vectors == len(rows)


@pytest.mark.parametrize("layout", ["float64 rows into float32", "strided sum"])
def test_update_reaches_a_sum_blas_cannot_update_in_place(layout):
    rows = np.random.default_rng(1).normal(size=(1, 9, 4)).astype(np.float32)
    if layout == "strided sum":
        storage = np.zeros((1, 4, 8), np.float32)
        sums = storage[:, :, ::2]
    else:
        rows = rows.astype(np.float64)
        sums = np.zeros((1, 4, 4), np.float32)
    numpy_gram_update(rows, sums)
    expected = rows[0].astype(np.float64).T @ rows[0].astype(np.float64)
    lower = np.tril_indices(4)
    assert np.allclose(sums[0][lower], expected[lower], rtol=1e-6)


def test_a_set_of_few_vectors_keeps_them_and_sums_them_when_more_come():
    """At most d / 2 vectors are kept as they are; a batch beyond what the first batch
    foretold (here a sequence that grows) folds them into a sum. The Gram matrix is the
    same either way."""
    rng = np.random.default_rng(2)
    few = rng.normal(size=(WIDTH // 2, WIDTH)).astype(np.float32)
    accumulator = GramAccumulator(_fully_connected_layer(), np.zeros(len(few), int), 0, (0, 0))
    for start in range(0, len(few), 8):
        accumulator.add(few[start : start + 8], start)
    assert isinstance(accumulator.statistic, Vectors)
    assert np.array_equal(accumulator.statistic.rows, few)
    exact = few.astype(np.float64).T @ few.astype(np.float64)
    assert np.abs(accumulator.gram[0] - exact).max() <= 1e-12 * np.abs(exact).max()

    sequence = rng.normal(size=(4, 5, WIDTH)).astype(np.float32)  # 4 samples
    accumulator = GramAccumulator(_fully_connected_layer(), np.zeros(4, int), 0, (0, 0))
    accumulator.add(sequence[:2, :1], 0)  # one vector a sample foretells 4 in all
    assert isinstance(accumulator.statistic, Vectors)
    accumulator.add(sequence[2:], 2)  # then 5 a sample
    assert not isinstance(accumulator.statistic, Vectors)
    rows = np.concatenate([sequence[:2, 0], sequence[2:].reshape(-1, WIDTH)]).astype(np.float64)
    exact = rows.T @ rows
    assert np.abs(accumulator.gram[0] - exact).max() <= 1e-6 * np.abs(exact).max()
    assert accumulator.vectors == len(rows)
