"""Which weights can be projected, where their values live and how they are oriented."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes  # onnx's own dependency: numpy's type for BFLOAT16 tensors
import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import GraphIndex, LayerDequantization, WeightSource, weight_as_seen

# The projected ops by what they compute; onnxruntime's optimiser writes the `Fused*` ones
# (a Conv, Gemm or MatMul with its activation or scaling folded in; same weight layout).
CONV_OPS = ("Conv", "FusedConv", "QLinearConv", "ConvInteger")
GEMM_OPS = ("Gemm", "FusedGemm", "QGemm")
MATMUL_OPS = ("MatMul", "FusedMatMul", "QLinearMatMul", "MatMulInteger")
# The integer layers of dynamic quantization: their input is quantized at run time by a
# DynamicQuantizeLinear, their weight's scale is applied to their output (Cast, Mul).
DYNAMIC_OPS = ("ConvInteger", "MatMulInteger")
DYNAMIC_QUANTIZE = "DynamicQuantizeLinear"
DYNAMIC_WEIGHT_ZERO_POINT = 3  # ConvInteger's and MatMulInteger's fourth input
PROJECTABLE_OPS = (*CONV_OPS, *GEMM_OPS, *MATMUL_OPS)


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
STANDARD_DOMAINS = ("", "ai.onnx")
MICROSOFT_DOMAIN = "com.microsoft"
MICROSOFT_OPS = ("FusedConv", "FusedGemm", "FusedMatMul", "QGemm")  # of that domain only
# Ops that carry a constant weight the projection leaves as it is: listed as skipped, with
# why, so no weight is ever dropped silently.
UNPROJECTED_WEIGHT_OPS = {
    "ConvTranspose": "ConvTranspose is not projected",
    "DynamicQuantizeMatMul": "integer layers of dynamic quantization are not projected yet",
    "MatMulNBits": "block-quantized weights are not projected",
    "LSTM": "recurrent layers are not projected",
    "GRU": "recurrent layers are not projected",
    "RNN": "recurrent layers are not projected",
    "Attention": "fused attention with packed weights is not projected",
}
BIAS_INPUT = 2  # where Conv and Gemm read their bias
PROJECTABLE_DTYPES = (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)

# Orientation of the weight as the layer uses it.
CONV = "conv"  # [out, in/groups, *kernel]: per group a [out/groups, d] matrix
OUT_IN = "out_in"  # [out, in]: Gemm with transB=1, y = x W^T
IN_OUT = "in_out"  # [in, out]: MatMul and Gemm with transB=0, y = x B


@dataclass(frozen=True)
class ConvGeometry:
    """What decides a conv's receptive-field patches: the im2col of its input."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begins then ends, as in ONNX
    auto_pad: str
    groups: int


@dataclass(frozen=True)
class Layer:
    """One projectable layer: `input_size` is the size `d` of the input vectors its weight
    sees (a conv's: its patches, `in/groups * prod(kernel)`)."""

    node: str
    op: str
    input: str
    weight: WeightSource
    weight_shape: tuple[int, ...]  # as the layer sees it, after the chain
    weight_dtype: np.dtype
    orientation: str
    groups: int
    input_size: int
    geometry: ConvGeometry | None
    shared: bool  # the stored weight also feeds another consumer: it gets its own copy
    input_dtype: np.dtype  # of the tensor the layer reads: its weight's, or an integer type
    # An integer layer's input is `(x - zero_point) * scale`: (scale, zero point), or for
    # one quantized at run time the names of the tensors holding them.
    input_dequantization: tuple[float, int] | tuple[str, str] | None = None
    bias_input: int | None = None  # where a Conv or Gemm reads its bias

    @property
    def statistic_key(self) -> tuple:
        """Layers reading the same tensor the same way share one Gram matrix."""
        return (self.input, self.geometry, self.input_dequantization)

    @property
    def output_axis(self) -> int:
        """The axis of the weight, as the layer sees it, that indexes its outputs."""
        return 1 if self.orientation == IN_OUT else 0


@dataclass(frozen=True)
class SkippedLayer:
    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class LayerScan:
    layers: tuple[Layer, ...]
    skipped: tuple[SkippedLayer, ...]


def scan_layers(model: onnx.ModelProto) -> LayerScan:
    """List the projectable layers of the top-level graph and the ones skipped, with why."""
    index = GraphIndex(model.graph)
    layers, skipped = [], []
    for name, node in zip(index.names, model.graph.node):
        if _is_projectable_op(node):
            found = _layer(index, name, node)
            if isinstance(found, Layer):
                layers.append(found)
            else:
                skipped.append(SkippedLayer(name, node.op_type, found))
        elif node.op_type in UNPROJECTED_WEIGHT_OPS and _has_constant_weight(index, node):
            skipped.append(SkippedLayer(name, node.op_type, UNPROJECTED_WEIGHT_OPS[node.op_type]))
        for owner, inner in _subgraph_layers(node):
            skipped.append(SkippedLayer(inner.name or owner, inner.op_type, "inside a subgraph"))
    sources = Counter(layer.weight.tensor for layer in layers)
    layers = [
        dataclasses.replace(
            layer,
            shared=sources[layer.weight.tensor] > 1 or not index.is_exclusive(layer.weight),
        )
        for layer in layers
    ]
    return LayerScan(tuple(layers), tuple(skipped))


def _is_projectable_op(node: onnx.NodeProto) -> bool:
    """A standard Conv, Gemm or MatMul (float or QLinear), or onnxruntime's fused or
    integer form of one."""
    if node.op_type in MICROSOFT_OPS:
        return node.domain == MICROSOFT_DOMAIN
    return node.op_type in PROJECTABLE_OPS and node.domain in STANDARD_DOMAINS


def _has_constant_weight(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether any input past the first comes from a stored constant of rank 2 or more."""
    for name in node.input[1:]:
        source = index.trace_weight(name) if name else None
        if source is not None and not isinstance(source, str):
            if len(index.constant_tensor(source.tensor).dims) >= 2:
                return True
    return False


def _subgraph_layers(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.NodeProto]]:
    for attribute in node.attribute:
        graphs = ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                if inner.op_type in PROJECTABLE_OPS:
                    yield node.name, inner
                yield from _subgraph_layers(inner)


def _layer(index: GraphIndex, name: str, node: onnx.NodeProto) -> Layer | str:
    """The Layer for a Conv/Gemm/MatMul node, or the reason it cannot be projected."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    layout = INTEGER_LAYOUTS.get(node.op_type)
    weight_position = layout.weight if layout else 1
    if len(node.input) <= weight_position:
        return "missing weight input"
    data, weight = node.input[0], node.input[weight_position]
    if attributes.get("transA", 0):
        return f"{node.op_type} with transA=1"
    if attributes.get("transBatchA", 0) or attributes.get("transBatchB", 0):
        return f"{node.op_type} with a transposed batch"
    if index.constant_tensor(data) is not None:
        return "the layer's input is a constant"
    source = index.trace_weight(weight)
    if isinstance(source, str):
        return source
    input_dequantization = None
    if layout is not None or node.op_type in DYNAMIC_OPS:
        if layout is not None:
            found = _integer_layer(index, node, layout, source, attributes)
        else:
            found = _dynamic_layer(index, node, source)
        if isinstance(found, str):
            return found
        source, input_dequantization = found
    shape, dtype = weight_as_seen(index, source)
    stored = index.constant_tensor(source.tensor)
    stored_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(stored.data_type))
    dequantized = stored_dtype.kind in "iuV" and index.is_dequantized(source)
    if not (stored_dtype in PROJECTABLE_DTYPES or dequantized) or dtype not in PROJECTABLE_DTYPES:
        return f"weight stored as {stored_dtype.name}, not a float type"
    geometry = None
    if node.op_type in CONV_OPS:
        if len(shape) < 3:
            return f"conv weight of rank {len(shape)}"
        groups = int(attributes.get("group", 1))
        spatial = len(shape) - 2
        kernel = tuple(shape[2:])
        geometry = ConvGeometry(
            kernel=kernel,
            strides=tuple(attributes.get("strides", (1,) * spatial)),
            dilations=tuple(attributes.get("dilations", (1,) * spatial)),
            pads=tuple(attributes.get("pads", (0,) * 2 * spatial)),
            auto_pad=_text(attributes.get("auto_pad", "NOTSET")),
            groups=groups,
        )
        orientation, input_size = CONV, shape[1] * int(np.prod(kernel))
        if shape[0] % groups:
            return f"{shape[0]} output channels do not split into {groups} groups"
    else:
        if len(shape) != 2:
            return f"weight of rank {len(shape)} (only 2-D weights are projected)"
        groups = 1
        transposed = attributes.get("transB", 0)  # Gemm's and FusedMatMul's
        orientation = OUT_IN if transposed else IN_OUT
        input_size = shape[1] if transposed else shape[0]
    return Layer(
        node=name,
        op=node.op_type,
        input=data,
        weight=source,
        weight_shape=shape,
        weight_dtype=np.dtype(dtype),
        orientation=orientation,
        groups=groups,
        input_size=input_size,
        geometry=geometry,
        shared=False,
        input_dtype=(
            np.dtype(dtype)
            if input_dequantization is None
            else _constant_dtype(index, node.input[2], np.uint8)
        ),
        input_dequantization=input_dequantization,
        bias_input=_bias_input(node, layout),
    )


def _bias_input(node: onnx.NodeProto, layout: IntegerLayout | None) -> int | None:
    """Where a Conv or Gemm reads its bias (a MatMul has none of its own)."""
    position = layout.bias if layout else BIAS_INPUT
    if node.op_type in MATMUL_OPS or position is None:
        return None
    return position if len(node.input) > position and node.input[position] else None


def _integer_layer(index, node, layout: IntegerLayout, source: WeightSource, attributes):
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
    axis = 0 if node.op_type in CONV_OPS or transposed else 1
    by_layer = LayerDequantization((names[layout.weight_scale],), weight_zero or None, axis)
    source = dataclasses.replace(source, dequantized_by_layer=by_layer)
    return source, (float(input_scale.reshape(())), int(zero.reshape(-1)[0]))


def _dynamic_layer(index: GraphIndex, node: onnx.NodeProto, source: WeightSource):
    """A dynamically quantized layer's weight, dequantized with the scale its output is
    multiplied by, and the run-time tensors holding its input's scale and zero point; or
    why it cannot be projected."""
    producer = index.producer.get(node.input[0])
    quantizer = index.graph.node[producer] if producer is not None else None
    if quantizer is None or quantizer.op_type != DYNAMIC_QUANTIZE:
        return "its input is not quantized by a DynamicQuantizeLinear"
    if source.chain:
        return "its integer weight passes through other nodes"
    scale = _output_weight_scale(index, node, quantizer.output[1])
    if scale is None:
        return "the scale of its weight was not found after it (Cast, Mul)"
    has_zero = len(node.input) > DYNAMIC_WEIGHT_ZERO_POINT and node.input[DYNAMIC_WEIGHT_ZERO_POINT]
    zero = node.input[DYNAMIC_WEIGHT_ZERO_POINT] if has_zero else None
    axis = 0 if node.op_type in CONV_OPS else 1  # per-channel scales run along the outputs
    by_layer = LayerDequantization((scale,), zero, axis)
    return dataclasses.replace(source, dequantized_by_layer=by_layer), tuple(quantizer.output[1:3])


def _output_weight_scale(index: GraphIndex, node: onnx.NodeProto, input_scale: str):
    """The constant weight scale of a dynamic integer layer: its output goes through a Cast
    and a Mul by `input scale x weight scale` (that product's constant factor)."""
    follow = _single_reader(index, node.output[0], "Cast")
    multiply = _single_reader(index, follow.output[0], "Mul") if follow else None
    if multiply is None:
        return None
    for name in multiply.input:
        producer = index.producer.get(name)
        product = index.graph.node[producer] if producer is not None else None
        if product is not None and product.op_type == "Mul" and input_scale in product.input:
            others = [n for n in product.input if n != input_scale]
            if len(others) == 1 and index.constant_tensor(others[0]) is not None:
                return others[0]
    return None


def _single_reader(index: GraphIndex, tensor: str, op_type: str) -> onnx.NodeProto | None:
    readers = index.readers.get(tensor, [])
    if len(readers) != 1 or index.graph.node[readers[0]].op_type != op_type:
        return None
    return index.graph.node[readers[0]]


def _constant_dtype(index: GraphIndex, name: str, default) -> np.dtype:
    """The element type of constant `name` (an integer input's zero point)."""
    tensor = index.constant_tensor(name) if name else None
    if tensor is None:
        return np.dtype(default)
    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Head:
    """The fully connected layer that writes the class logits, and its bias if any.

    `logits` is the tensor holding the layer's output with the bias added: a Gemm's
    output, or the Add that follows a MatMul.
    """

    layer: Layer
    logits: str
    bias: WeightSource | None = None
    bias_node: str | None = None
    bias_input: int | None = None
    bias_shared: bool = False
    # An integer head writes quantized logits: (scale, zero point) and their type.
    logits_dequantization: tuple[float, int] | None = None
    logits_dtype: np.dtype | None = None


def find_head(
    model: onnx.ModelProto, scan: LayerScan, class_count: int, scores_name: str
) -> Head | None:
    """The last fully connected layer with `class_count` outputs whose output reaches the
    scores, in graph order. Its logits may still hold more than one row per sample (a
    token-wise head): the caller checks their shape."""
    index = GraphIndex(model.graph)
    heads = [
        layer
        for layer in scan.layers
        if layer.orientation != CONV
        and layer.weight_shape[0 if layer.orientation == OUT_IN else 1] == class_count
        and index.reaches(index.node_by_name[layer.node].output[0], scores_name)
    ]
    if not heads:
        return None
    layer = heads[-1]
    node = index.node_by_name[layer.node]
    if node.op_type in GEMM_OPS:
        head = Head(layer, node.output[0], **_quantized_logits(index, node))
        bias = index.trace_weight(node.input[layer.bias_input]) if layer.bias_input else None
        if isinstance(bias, WeightSource):
            layout = INTEGER_LAYOUTS.get(node.op_type)
            if layout is not None:  # an int32 bias scaled by input scale x weight scale
                scales = (node.input[layout.input_scale], node.input[layout.weight_scale])
                bias = dataclasses.replace(
                    bias, dequantized_by_layer=LayerDequantization(scales, None, 0)
                )
            shared = not index.is_exclusive(bias)
            head = dataclasses.replace(head, bias=bias, bias_node=layer.node)
            head = dataclasses.replace(head, bias_input=layer.bias_input, bias_shared=shared)
        return head
    output = node.output[0]
    if node.op_type in DYNAMIC_OPS:  # its float output: after the Cast and the scale's Mul
        cast = _single_reader(index, output, "Cast")
        multiply = _single_reader(index, cast.output[0], "Mul") if cast else None
        output = multiply.output[0] if multiply else output
    readers = [(index.names[i], model.graph.node[i]) for i in index.readers.get(output, ())]
    if len(readers) == 1 and readers[0][1].op_type == "Add":
        name, add = readers[0]
        position = 1 - list(add.input).index(output)
        bias = index.trace_weight(add.input[position])
        tensor = index.constant_tensor(bias.tensor) if isinstance(bias, WeightSource) else None
        if tensor is not None and int(np.prod(tensor.dims)) == class_count:
            shared = not index.is_exclusive(bias)
            return Head(layer, add.output[0], bias, name, position, shared)
    return Head(layer, output)


def _quantized_logits(index: GraphIndex, node: onnx.NodeProto) -> dict:
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
        "logits_dtype": _constant_dtype(index, zero_name, np.uint8),
    }


def run_time_quantization(layer: Layer) -> tuple[str, ...]:
    """The tensors holding the scale and zero point of an input quantized at run time."""
    names = layer.input_dequantization or ()
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
