"""Which layers are found, how their weights are traced, and how rewrites honour that."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_forget.layer_scan import CONV, IN_OUT, OUT_IN, scan_layers
from onnx_forget.rewrite import rewrite_model
from tests import models
from tests.helpers import run_model
from tests.models import by_matrix

K, N = 6, 3


def _fc_input(dtype=TensorProto.FLOAT):
    return [helper.make_tensor_value_info("x", dtype, ["B", K])]


def _fc_output(dtype=TensorProto.FLOAT):
    return [helper.make_tensor_value_info("y", dtype, ["B", N])]


def _random_projections(layers, seed=0):
    rng = np.random.default_rng(seed)
    return {
        layer.statistic_key: rng.normal(size=(layer.groups, layer.input_size, layer.input_size))
        for layer in layers
    }


def test_weight_through_cast_and_transpose_is_projected_in_its_stored_type():
    """A float16 [N, K] weight, Cast to float32 and Transposed, becomes `P B` as the layer
    sees it and stays float16 on disk: new(x) == original(x P)."""
    rng = np.random.default_rng(1)
    stored = rng.normal(size=(N, K)).astype(np.float16)
    model = models.make_model(
        [
            helper.make_node("Cast", ["w16"], ["w32"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["w32"], ["wt"], name="transpose", perm=[1, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm"),
        ],
        _fc_input(),
        _fc_output(),
        [numpy_helper.from_array(stored, "w16")],
    )
    (layer,) = scan_layers(model).layers
    assert (layer.orientation, layer.input_size, layer.weight.tensor) == (IN_OUT, K, "w16")
    assert layer.weight.chain == ("cast", "transpose")
    projections = _random_projections([layer])
    rewritten, copies, _ = rewrite_model(model, (layer,), by_matrix(projections), {})
    assert copies == []
    new_weight = numpy_helper.to_array(rewritten.graph.initializer[0])
    assert new_weight.dtype == np.float16 and new_weight.shape == (N, K)
    x = rng.normal(size=(5, K)).astype(np.float32)
    p = projections[layer.statistic_key][0]
    expected = run_model(model, (x @ p).astype(np.float32))
    np.testing.assert_allclose(run_model(rewritten, x), expected, rtol=2e-2, atol=2e-2)


def test_gemm_orientations_and_constant_node_weight():
    """Gemm transB=1 keeps `[out, in]`, transB=0 `[in, out]`; a Constant node counts as stored."""
    rng = np.random.default_rng(2)
    model = models.make_model(
        [
            helper.make_node(
                "Constant",
                [],
                ["w1"],
                name="const",
                value=numpy_helper.from_array(rng.normal(size=(K, K)).astype(np.float32)),
            ),
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="g1", transB=1),
            helper.make_node("Gemm", ["h", "w2"], ["y"], name="g2"),
        ],
        _fc_input(),
        _fc_output(),
        [numpy_helper.from_array(rng.normal(size=(K, N)).astype(np.float32), "w2")],
    )
    first, second = scan_layers(model).layers
    assert (first.orientation, first.weight.is_initializer) == (OUT_IN, False)
    assert (second.orientation, second.weight.is_initializer) == (IN_OUT, True)
    projections = _random_projections([first, second])
    rewritten, _, _ = rewrite_model(model, (first, second), by_matrix(projections), {})
    x = rng.normal(size=(4, K)).astype(np.float32)
    p1, p2 = projections[first.statistic_key][0], projections[second.statistic_key][0]
    w1 = numpy_helper.to_array(model.graph.node[0].attribute[0].t).astype(np.float64)
    w2 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    expected = ((x @ p1) @ w1.T) @ p2 @ w2
    np.testing.assert_allclose(run_model(rewritten, x), expected, rtol=1e-4, atol=1e-4)


def test_shared_weight_gets_one_copy_per_layer_and_other_readers_keep_the_original():
    """Tied weights: two MatMuls and an Add read `w`; each MatMul gets its own projected copy."""
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(K, K)).astype(np.float32)
    model = models.make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "w"], ["h2"], name="mm2"),
            helper.make_node("Add", ["h2", "w"], ["y"], name="add"),
        ],
        _fc_input(),
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", K])],
        [numpy_helper.from_array(weight, "w")],
    )
    layers = scan_layers(model).layers
    assert [layer.shared for layer in layers] == [True, True]
    projections = _random_projections(layers)
    rewritten, copies, _ = rewrite_model(model, layers, by_matrix(projections), {})
    assert len(copies) == 2
    stored = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert stored["w"].tobytes() == weight.tobytes()  # the Add still reads the original
    p1, p2 = (projections[layer.statistic_key][0] for layer in layers)
    x = rng.normal(size=(K, K)).astype(np.float32)  # K rows, so the Add broadcasts
    expected = (x @ p1 @ weight) @ p2 @ weight + weight
    np.testing.assert_allclose(run_model(rewritten, x), expected, rtol=1e-4, atol=1e-4)


def test_unused_original_is_dropped_when_every_reader_got_a_copy():
    weight = np.eye(K, dtype=np.float32)
    model = models.make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], name="t"),
            helper.make_node("MatMul", ["x", "wt"], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "wt"], ["y"], name="mm2"),
        ],
        _fc_input(),
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", K])],
        [numpy_helper.from_array(weight, "w")],
    )
    layers = scan_layers(model).layers
    rewritten, copies, _ = rewrite_model(model, layers, by_matrix(_random_projections(layers)), {})
    names = [t.name for t in rewritten.graph.initializer]
    assert "w" not in names and len(names) == 2 and len(copies) == 2
    assert [n.op_type for n in rewritten.graph.node].count("Transpose") == 2


def test_skipped_layers_say_why():
    """A run-time weight, transA=1, a 3-D MatMul weight and a subgraph layer are listed."""
    rng = np.random.default_rng(4)
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wb"], ["inner"], name="inside")],
        "branch",
        [],
        [helper.make_tensor_value_info("inner", TensorProto.FLOAT, ["B", K])],
        [numpy_helper.from_array(np.eye(K, dtype=np.float32), "wb")],
    )
    model = models.make_model(
        [
            helper.make_node("Relu", ["x"], ["rx"]),
            helper.make_node("MatMul", ["x", "rx"], ["a"], name="runtime"),
            helper.make_node("Gemm", ["x", "wk"], ["b"], name="transa", transA=1),
            helper.make_node("MatMul", ["x", "w3"], ["c"], name="rank3"),
            helper.make_node(
                "If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch
            ),
        ],
        _fc_input(),
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", K])],
        [
            numpy_helper.from_array(rng.normal(size=(K, K)).astype(np.float32), "wk"),
            numpy_helper.from_array(rng.normal(size=(2, K, K)).astype(np.float32), "w3"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    scan = scan_layers(model)
    assert scan.layers == ()
    reasons = {s.node: s.reason for s in scan.skipped}
    assert "computed at run time" in reasons["runtime"]
    assert "transA" in reasons["transa"]
    assert "rank 3" in reasons["rank3"]
    assert reasons["inside"] == "inside a subgraph"


def test_conv_layer_geometry_and_size():
    model = models.mixed_model(models.mixed_weights())
    conv = scan_layers(model).layers[0]
    assert conv.orientation == CONV and conv.groups == 2 and conv.input_size == 2 * 3 * 3
    assert conv.geometry.strides == (2, 2) and conv.geometry.pads == models.CONV_PADS
