"""Small random ONNX models built with onnx.helper, for exact algebra tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime 1.2x reads IR <= 10 models
OPSET = 17

# The mixed model: Conv (pads, stride 2, dilation 2, 2 groups by default) -> Relu -> Reshape to
# [N, 6, 20] -> MatMul by [20, 5] (3-D input) -> Relu -> Flatten -> Gemm transB=1 ->
# Relu -> Gemm transB=0 -> scores [N, 4].
MIXED_INPUT = (4, 11, 11)
CONV_PADS = (1, 2, 0, 1)
CONV_STRIDES = (2, 2)
CONV_DILATIONS = (2, 2)
CONV_GROUPS = 2
MIXED_CLASSES = 4
# For runs compared at float32 rounding, where only the batching differs: on the CPU.
# On CUDA, cuDNN may choose another conv algorithm per batch shape; tests/test_gpu.py
# bounds CUDA against the CPU (1e-4).
ON_CPU = {"device": "cpu"}


def make_model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def mixed_weights(seed: int = 0, groups: int = CONV_GROUPS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv_w": rng.normal(size=(6, MIXED_INPUT[0] // groups, 3, 3)).astype(np.float32),
        "conv_b": rng.normal(size=6).astype(np.float32),
        "matmul_w": rng.normal(size=(20, 5)).astype(np.float32) / 4,
        "gemm1_w": rng.normal(size=(8, 30)).astype(np.float32) / 5,
        "gemm1_b": rng.normal(size=8).astype(np.float32),
        "gemm2_w": rng.normal(size=(8, MIXED_CLASSES)).astype(np.float32) / 3,
    }


def conv_groups(weights: dict[str, np.ndarray]) -> int:
    """The mixed model's conv groups, read from its weight's input channels per group."""
    return MIXED_INPUT[0] // weights["conv_w"].shape[1]


def mixed_model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    initializers = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([0, 6, 20], np.int64), "shape"))
    nodes = [
        helper.make_node(
            "Conv",
            ["input", "conv_w", "conv_b"],
            ["conv_out"],
            name="conv",
            pads=CONV_PADS,
            strides=CONV_STRIDES,
            dilations=CONV_DILATIONS,
            group=conv_groups(weights),
        ),
        helper.make_node("Relu", ["conv_out"], ["conv_act"]),
        helper.make_node("Reshape", ["conv_act", "shape"], ["tokens"]),
        helper.make_node("MatMul", ["tokens", "matmul_w"], ["mm_out"], name="matmul"),
        helper.make_node("Relu", ["mm_out"], ["mm_act"]),
        helper.make_node("Flatten", ["mm_act"], ["flat"]),
        helper.make_node(
            "Gemm", ["flat", "gemm1_w", "gemm1_b"], ["g1_out"], name="gemm1", transB=1
        ),
        helper.make_node("Relu", ["g1_out"], ["g1_act"]),
        helper.make_node("Gemm", ["g1_act", "gemm2_w"], ["scores"], name="gemm2"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *MIXED_INPUT])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", MIXED_CLASSES])],
        initializers,
    )


def by_matrix(matrices: dict[tuple, np.ndarray]):
    """Projections given as explicit `[groups, d, d]` matrices `P`, as rewrite_model takes
    them: by statistic key, a function applying `P` to `[groups, d, k]` column blocks."""
    return lambda key: lambda columns: matrices[key] @ columns


def float_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer by name, in float64."""
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def largest_relative_difference(a: dict, b: dict) -> float:
    """Over the tensors of `b`: the largest `max |a - b| / max |b|` (all-zero `b` counts
    its absolute difference)."""
    return max(
        float(np.max(np.abs(a[k] - b[k])) / max(float(np.max(np.abs(b[k]))), 1e-30)) for k in b
    )
