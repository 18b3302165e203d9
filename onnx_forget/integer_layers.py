"""Integer layers: where QOperator and dynamically quantized layers read the scales they
dequantize their input and weight with, and that dequantization on the host."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import GraphIndex, LayerDequantization, WeightSource

INTEGER_CONV_OPS = ("QLinearConv", "ConvInteger")  # per-channel scales on the first axis
# The integer layers of dynamic quantization: their input is quantized at run time by a
# DynamicQuantizeLinear, their weight's scale is applied to their output (Cast, Mul).
DYNAMIC_OPS = ("ConvInteger", "MatMulInteger")
DYNAMIC_QUANTIZE = "DynamicQuantizeLinear"
DYNAMIC_WEIGHT_ZERO_POINT = 3  # ConvInteger's and MatMulInteger's fourth input


@dataclass(frozen=True)
class IntegerLayout:
    """Where a QOperator layer reads what it dequantizes itself: input positions of its
    input's scale and zero point, its weight and the weight's scale and zero point, its
    int32 bias (dequantized with input scale x weight scale), and its output's scale and
    zero point."""

    input_scale: int
    input_zero_point: int
    weight: int
    weight_scale: int
    weight_zero_point: int
    bias: int | None
    output_scale: int
    output_zero_point: int


INTEGER_LAYOUTS = {
    "QLinearConv": IntegerLayout(1, 2, 3, 4, 5, 8, 6, 7),
    "QLinearMatMul": IntegerLayout(1, 2, 3, 4, 5, None, 6, 7),
    "QGemm": IntegerLayout(1, 2, 3, 4, 5, 6, 7, 8),
}


def integer_layer(index, node, layout: IntegerLayout, source: WeightSource, attributes):
    """An integer layer's weight as dequantized by the layer, and its input's (scale,
    zero point); or why it cannot be projected."""
    names = list(node.input)
    needed = (layout.input_scale, layout.weight_scale)
    if any(len(names) <= i or index.constant_tensor(names[i]) is None for i in needed):
        return "its scales are not constants"
    if source.chain:
        return "its integer weight passes through other nodes"
    input_scale = numpy_helper.to_array(index.constant_tensor(names[layout.input_scale]))
    if input_scale.size != 1:
        return "its input is quantized per channel"
    zero_name = names[layout.input_zero_point] if layout.input_zero_point < len(names) else ""
    zero = numpy_helper.to_array(index.constant_tensor(zero_name)) if zero_name else np.zeros(1)
    weight_zero = names[layout.weight_zero_point] if layout.weight_zero_point < len(names) else ""
    # Per-channel scales run along the outputs: a conv's first axis, a [K, N] weight's last.
    transposed = node.op_type == "QGemm" and attributes.get("transB", 0)
    axis = 0 if node.op_type in INTEGER_CONV_OPS or transposed else 1
    by_layer = LayerDequantization((names[layout.weight_scale],), weight_zero or None, axis)
    source = dataclasses.replace(source, dequantized_by_layer=by_layer)
    return source, (float(input_scale.reshape(())), int(zero.reshape(-1)[0]))


def dynamic_layer(index: GraphIndex, node: onnx.NodeProto, source: WeightSource):
    """A dynamically quantized layer's weight, dequantized with the scale its output is
    multiplied by, and the run-time tensors holding its input's scale and zero point; or
    why it cannot be projected."""
    quantizer = index.producer_node(node.input[0])
    if quantizer is None or quantizer.op_type != DYNAMIC_QUANTIZE:
        return "its input is not quantized by a DynamicQuantizeLinear"
    if source.chain:
        return "its integer weight passes through other nodes"
    scale = _output_weight_scale(index, node, quantizer.output[1])
    if scale is None:
        return "the scale of its weight was not found after it (Cast, Mul)"
    has_zero = len(node.input) > DYNAMIC_WEIGHT_ZERO_POINT and node.input[DYNAMIC_WEIGHT_ZERO_POINT]
    zero = node.input[DYNAMIC_WEIGHT_ZERO_POINT] if has_zero else None
    axis = 0 if node.op_type in INTEGER_CONV_OPS else 1  # per-channel scales run along the outputs
    by_layer = LayerDequantization((scale,), zero, axis)
    return dataclasses.replace(source, dequantized_by_layer=by_layer), tuple(quantizer.output[1:3])


def _output_weight_scale(index: GraphIndex, node: onnx.NodeProto, input_scale: str):
    """The constant weight scale of a dynamic integer layer: its output goes through a Cast
    and a Mul by `input scale x weight scale` (that product's constant factor)."""
    follow = single_reader(index, node.output[0], "Cast")
    multiply = single_reader(index, follow.output[0], "Mul") if follow else None
    if multiply is None:
        return None
    for name in multiply.input:
        product = index.producer_node(name)
        if product is not None and product.op_type == "Mul" and input_scale in product.input:
            others = [n for n in product.input if n != input_scale]
            if len(others) == 1 and index.constant_tensor(others[0]) is not None:
                return others[0]
    return None


def single_reader(index: GraphIndex, tensor: str, op_type: str) -> onnx.NodeProto | None:
    readers = index.readers.get(tensor, [])
    if len(readers) != 1 or index.graph.node[readers[0]].op_type != op_type:
        return None
    return index.graph.node[readers[0]]


def constant_dtype(index: GraphIndex, name: str, default) -> np.dtype:
    """The element type of constant `name` (an integer input's zero point)."""
    tensor = index.constant_tensor(name) if name else None
    if tensor is None:
        return np.dtype(default)
    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))


def quantized_logits(index: GraphIndex, node: onnx.NodeProto) -> dict:
    """An integer head's output quantization, as Head fields (none for a float head)."""
    layout = INTEGER_LAYOUTS.get(node.op_type)
    if layout is None or len(node.input) <= layout.output_scale:
        return {}
    if not node.input[layout.output_scale]:
        return {}
    scale = numpy_helper.to_array(index.constant_tensor(node.input[layout.output_scale]))
    has_zero = len(node.input) > layout.output_zero_point
    zero_name = node.input[layout.output_zero_point] if has_zero else ""
    zero = numpy_helper.to_array(index.constant_tensor(zero_name)) if zero_name else np.zeros(1)
    return {
        "logits_dequantization": (float(scale.reshape(())), int(zero.reshape(-1)[0])),
        "logits_dtype": constant_dtype(index, zero_name, np.uint8),
    }


def run_time_quantization(dequantization) -> tuple[str, ...]:
    """The tensors holding the scale and zero point of an input quantized at run time (a
    layer's `input_dequantization` names them), or none."""
    names = dequantization or ()
    return tuple(names) if names and isinstance(names[0], str) else ()


def dequantized(
    values: np.ndarray,
    dequantization: tuple[float, int] | tuple[str, str] | None,
    tapped: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """`(values - zero_point) * scale` of an integer tensor, in float32, the scale and
    zero point given or, by name, among the `tapped` tensors; float values as they are."""
    if dequantization is None:
        return values
    scale, zero = dequantization
    if isinstance(scale, str):  # quantized at run time: this batch's scale and zero point
        scale, zero = float(tapped[scale]), int(tapped[zero])
    return (values.astype(np.float32) - np.float32(zero)) * np.float32(scale)
