"""Which weights can be projected, where their values live and how they are oriented."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes  # onnx's own dependency: numpy's type for BFLOAT16 tensors
import numpy as np
import onnx
from onnx import helper

from .graph import GraphIndex, LayerDequantization, WeightSource, weight_as_seen
from .integer_layers import (
    DYNAMIC_OPS,
    INTEGER_LAYOUTS,
    IntegerLayout,
    constant_dtype,
    dynamic_layer,
    integer_layer,
    quantized_logits,
    single_reader,
)

# The projected ops by what they compute; onnxruntime's optimiser writes the `Fused*` ones
# (a Conv, Gemm or MatMul with its activation or scaling folded in; same weight layout).
CONV_OPS = ("Conv", "FusedConv", "QLinearConv", "ConvInteger")
GEMM_OPS = ("Gemm", "FusedGemm", "QGemm")
MATMUL_OPS = ("MatMul", "FusedMatMul", "QLinearMatMul", "MatMulInteger")
PROJECTABLE_OPS = (*CONV_OPS, *GEMM_OPS, *MATMUL_OPS)


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
            found = integer_layer(index, node, layout, source, attributes)
        else:
            found = dynamic_layer(index, node, source)
        if isinstance(found, str):
            return found
        source, input_dequantization = found
    shape, dtype = weight_as_seen(index, source)
    stored = index.constant_tensor(source.tensor)
    stored_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(stored.data_type))
    dequantized = stored_dtype.kind in "iuV" and index.is_dequantized(source)
    if not (stored_dtype in PROJECTABLE_DTYPES or dequantized) or dtype not in PROJECTABLE_DTYPES:
        return f"weight stored as {stored_dtype.name}, not a float type"
    oriented = _orientation(node.op_type in CONV_OPS, shape, attributes)
    if isinstance(oriented, str):
        return oriented
    orientation, input_size, groups, geometry = oriented
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
            else constant_dtype(index, node.input[2], np.uint8)
        ),
        input_dequantization=input_dequantization,
        bias_input=_bias_input(node, layout),
    )


def _orientation(is_conv: bool, shape: tuple[int, ...], attributes: dict):
    """(orientation, input size, groups, conv geometry) of a weight seen as `shape`, or
    why it cannot be projected."""
    if not is_conv:
        if len(shape) != 2:
            return f"weight of rank {len(shape)} (only 2-D weights are projected)"
        transposed = attributes.get("transB", 0)  # Gemm's and FusedMatMul's
        return (OUT_IN, shape[1], 1, None) if transposed else (IN_OUT, shape[0], 1, None)
    if len(shape) < 3:
        return f"conv weight of rank {len(shape)}"
    groups = int(attributes.get("group", 1))
    if shape[0] % groups:
        return f"{shape[0]} output channels do not split into {groups} groups"
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
    return CONV, shape[1] * int(np.prod(kernel)), groups, geometry


def _bias_input(node: onnx.NodeProto, layout: IntegerLayout | None) -> int | None:
    """Where a Conv or Gemm reads its bias (a MatMul has none of its own)."""
    position = layout.bias if layout else BIAS_INPUT
    if node.op_type in MATMUL_OPS or position is None:
        return None
    return position if len(node.input) > position and node.input[position] else None


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
        head = Head(layer, node.output[0], **quantized_logits(index, node))
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
        cast = single_reader(index, output, "Cast")
        multiply = single_reader(index, cast.output[0], "Mul") if cast else None
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
