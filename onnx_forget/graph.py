"""One index of a graph's nodes and constants, and the pass-through chains between a stored
weight and the layer that reads it: what layer discovery reads and the rewrite edits."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import ml_dtypes  # onnx's own dependency: the limits of int4 and uint4
import numpy as np
import onnx
from onnx import helper, numpy_helper

# How a quantized weight becomes the float one its layer reads: `(q - zero_point) * scale`.
DEQUANTIZE = "DequantizeLinear"
# Nodes a constant weight may pass through on its way to a layer; each is invertible (a
# dequantization up to rounding), so the projected weight can be written back into the
# stored tensor.
WEIGHT_PASSTHROUGH = ("Identity", "Transpose", "Cast", "Reshape", DEQUANTIZE)


@dataclass(frozen=True)
class WeightSource:
    """A stored constant and the pass-through nodes between it and the layer.

    `tensor` is an initializer's name or a Constant node's output; `chain` lists the node
    names from the stored tensor to the layer's weight input, in graph order.
    """

    tensor: str
    is_initializer: bool
    chain: tuple[str, ...]
    # Set when the layer itself dequantizes the stored integers (QLinearConv, QGemm, ...).
    dequantized_by_layer: LayerDequantization | None = None


@dataclass(frozen=True)
class LayerDequantization:
    """How an integer layer dequantizes a weight it reads: the constants holding the scale
    (or two whose product is the scale, as for an int32 bias: input scale x weight scale)
    and zero point, and the axis of per-channel scales."""

    scale: tuple[str, ...]
    zero_point: str | None
    axis: int


def node_names(graph: onnx.GraphProto) -> list[str]:
    """A unique name per node; unnamed nodes are called `<op>_<index>`."""
    return [node.name or f"{node.op_type}_{index}" for index, node in enumerate(graph.node)]


class GraphIndex:
    """Look-ups over the top-level graph: producers, readers, constants, and the
    pass-through chains that carry a stored weight to the layer reading it."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.names = node_names(graph)
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {}
        self.consumers = Counter()
        self.readers: dict[str, list[int]] = {}  # tensor -> indices of the nodes reading it
        for index, node in enumerate(graph.node):
            for name in node.output:
                self.producer[name] = index
            for name in node.input:
                self.consumers[name] += 1
                self.readers.setdefault(name, []).append(index)
        for output in graph.output:
            self.consumers[output.name] += 1
        self.node_by_name = dict(zip(self.names, graph.node))
        graph_inputs = {i.name for i in graph.input}
        self.runtime_inputs = graph_inputs - set(self.initializers)

    def constant_tensor(self, name: str) -> onnx.TensorProto | None:
        """The TensorProto behind `name` if it is an initializer or a Constant's value."""
        if name in self.initializers:
            return self.initializers[name]
        index = self.producer.get(name)
        if index is not None and self.graph.node[index].op_type == "Constant":
            for attribute in self.graph.node[index].attribute:
                if attribute.name == "value":
                    return attribute.t
        return None

    def trace_weight(self, name: str) -> WeightSource | str:
        """Follow pass-through nodes back to a stored constant, or say why not."""
        chain = []
        while True:
            if self.constant_tensor(name) is not None:
                return WeightSource(name, name in self.initializers, tuple(reversed(chain)))
            if name in self.runtime_inputs:
                return f"weight {name!r} is a graph input"
            index = self.producer.get(name)
            if index is None:
                return f"weight {name!r} has no producer"
            node = self.graph.node[index]
            if node.op_type not in WEIGHT_PASSTHROUGH:
                return f"weight is computed at run time (by {node.op_type})"
            if node.op_type == "Reshape" and self.constant_tensor(node.input[1]) is None:
                return "weight is reshaped to a run-time shape"
            if node.op_type == DEQUANTIZE:
                problem = self._dequantization_problem(node)
                if problem:
                    return problem
            chain.append(self.names[index])
            name = node.input[0]

    def _dequantization_problem(self, node: onnx.NodeProto) -> str | None:
        """Why a DequantizeLinear on a weight's way cannot be undone, or None."""
        if any(name and self.constant_tensor(name) is None for name in node.input[1:]):
            return "weight is dequantized with a run-time scale or zero point"
        if self.constant_tensor(node.input[0]) is None:
            return "weight is dequantized after other nodes"
        if any(a.name == "block_size" and a.i for a in node.attribute):
            return "weight is block-quantized"
        return None

    def producer_node(self, name: str) -> onnx.NodeProto | None:
        """The node writing tensor `name`; None for graph inputs and constants."""
        index = self.producer.get(name)
        return None if index is None else self.graph.node[index]

    def is_dequantized(self, source: WeightSource) -> bool:
        """Whether the stored weight is integers that a DequantizeLinear, or the layer
        itself, turns into floats."""
        if source.dequantized_by_layer is not None:
            return True
        return any(self.node_by_name[name].op_type == DEQUANTIZE for name in source.chain)

    def reaches(self, start: str, goal: str) -> bool:
        """Whether tensor `goal` is computed from tensor `start`."""
        seen, frontier = {start}, [start]
        while frontier:
            name = frontier.pop()
            if name == goal:
                return True
            for reader in self.readers.get(name, ()):
                for output in self.graph.node[reader].output:
                    if output and output not in seen:
                        seen.add(output)
                        frontier.append(output)
        return False

    def is_exclusive(self, source: WeightSource) -> bool:
        """True when the stored weight and its chain feed one consumer and nothing else."""
        names_on_path = [source.tensor] + [self.node_by_name[n].output[0] for n in source.chain]
        return all(self.consumers[name] == 1 for name in names_on_path)


def reshape_target(shape: tuple[int, ...], target, allowzero: int = 0) -> tuple[int, ...]:
    """ONNX Reshape's output shape: 0 copies a dim (unless allowzero), -1 is inferred."""
    dims = [shape[i] if (int(d) == 0 and not allowzero) else int(d) for i, d in enumerate(target)]
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1]))
        dims[dims.index(-1)] = int(np.prod(shape)) // known if known else 0
    return tuple(dims)


@dataclass(frozen=True)
class Quantization:
    """A DequantizeLinear's `(q - zero_point) * scale`, per channel along `axis` or, with
    `axis` None, one scale for the whole tensor."""

    scale_name: str | None  # None: the scale is a product of constants and stays fixed
    scale: np.ndarray  # float64: [channels], or a scalar
    scale_dtype: np.dtype
    zero_point: np.ndarray  # int64, shaped as `scale`
    axis: int | None
    stored_dtype: np.dtype  # int8, uint8, int4, ... as stored

    def dequantize(self, stored: np.ndarray) -> np.ndarray:
        """The float64 weight of stored integers."""
        scale, zero = (
            self._along(self.scale, stored.ndim),
            self._along(self.zero_point, stored.ndim),
        )
        return (stored.astype(np.int64) - zero) * scale

    def quantize(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored integers for a float64 `weight`, and the scales used.

        A channel keeps its scale where the weight still fits the stored type; where it
        would saturate, the scale grows to the smallest that holds it (zero point kept).
        """
        low, high = _limits(self.stored_dtype)
        zero = self._along(self.zero_point, weight.ndim)
        old = self._along(self.scale, weight.ndim)
        others = tuple(a for a in range(weight.ndim) if a != self.axis)
        rounded = np.rint(weight / old) + zero
        fits = ((rounded >= low) & (rounded <= high)).all(axis=others, keepdims=True)
        # The smallest scale putting the largest and smallest values at the type's ends.
        needed = np.maximum(
            (np.maximum(weight, 0) / (high - zero)).max(axis=others, keepdims=True),
            (np.minimum(weight, 0) / (low - zero)).max(axis=others, keepdims=True),
        )
        scale = np.where(fits, old, needed).astype(self.scale_dtype).astype(np.float64)
        scale = np.where(scale > 0, scale, old)  # an all-zero channel keeps its scale
        if self.scale_name is None:
            scale = np.broadcast_to(old, scale.shape)  # fixed: saturate rather than rescale
        stored = np.clip(np.rint(weight / scale) + zero, low, high)
        return stored.astype(self.stored_dtype), scale.reshape(self.scale.shape)

    def _along(self, values: np.ndarray, ndim: int) -> np.ndarray:
        """`values` shaped to broadcast along `axis` of an array of rank `ndim`."""
        if self.axis is None:
            return values.reshape(())
        shape = [1] * ndim
        shape[self.axis] = -1
        return values.reshape(shape)


def _limits(dtype: np.dtype) -> tuple[int, int]:
    """The smallest and largest integer of a stored type (ml_dtypes knows int4 and numpy's)."""
    info = ml_dtypes.iinfo(dtype)
    return int(info.min), int(info.max)


@dataclass(frozen=True)
class PassThroughStep:
    """What one pass-through node does to the weight on its way to the layer."""

    op: str
    before: tuple[int, ...]  # the weight's shape entering the node
    after: tuple[int, ...]  # and leaving it
    perm: tuple[int, ...] | None = None  # Transpose's
    dtype: np.dtype | None = None  # the type it gives the weight: Cast's, DequantizeLinear's
    quantization: Quantization | None = None  # DequantizeLinear's

    def forward(self, value: np.ndarray) -> np.ndarray:
        if self.op == "Transpose":
            return value.transpose(self.perm)
        if self.quantization is not None:
            return self.quantization.dequantize(value)
        return value.reshape(self.after)  # Reshape; Identity and Cast keep the shape

    def backward(self, value: np.ndarray) -> np.ndarray:
        """Undo the step, a dequantization excepted (`Quantization.quantize` does that,
        since it may change the scales too)."""
        if self.op == "Transpose":
            return value.transpose(np.argsort(self.perm))
        return value.reshape(self.before)


def pass_through_steps(index: GraphIndex, source: WeightSource) -> list[PassThroughStep]:
    """The steps of `source`'s chain, from the stored tensor to the layer, with shapes."""
    shape = tuple(index.constant_tensor(source.tensor).dims)
    steps = []
    by_layer = source.dequantized_by_layer
    if by_layer is not None:
        quantization = _quantization(
            index, source.tensor, by_layer.scale, by_layer.zero_point, by_layer.axis, len(shape)
        )
        steps.append(
            PassThroughStep(
                DEQUANTIZE, shape, shape, None, np.dtype(quantization.scale_dtype), quantization
            )
        )
    for name in source.chain:
        node = index.node_by_name[name]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        perm, dtype, after = None, None, shape
        if node.op_type == "Transpose":
            perm = tuple(attributes.get("perm", tuple(reversed(range(len(shape))))))
            after = tuple(shape[p] for p in perm)
        elif node.op_type == "Cast":
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(attributes["to"]))
        elif node.op_type == "Reshape":
            target = numpy_helper.to_array(index.constant_tensor(node.input[1]))
            after = reshape_target(shape, target, attributes.get("allowzero", 0))
        elif node.op_type == DEQUANTIZE:
            zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
            quantization = _quantization(
                index,
                node.input[0],
                (node.input[1],),
                zero_point,
                int(attributes.get("axis", 1)),
                len(shape),
            )
            dtype = np.dtype(quantization.scale_dtype)
            if attributes.get("output_dtype"):  # opset 23: the float type it writes
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(attributes["output_dtype"]))
            steps.append(PassThroughStep(node.op_type, shape, shape, None, dtype, quantization))
            continue
        steps.append(PassThroughStep(node.op_type, shape, after, perm, dtype))
        shape = after
    return steps


def weight_as_seen(index: GraphIndex, source: WeightSource) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the weight as the layer sees it, after its chain."""
    tensor = index.constant_tensor(source.tensor)
    shape, dtype = tuple(tensor.dims), np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    for step in pass_through_steps(index, source):
        shape, dtype = step.after, step.dtype or dtype
    return shape, dtype


def _quantization(
    index: GraphIndex,
    stored_name: str,
    scale_names: tuple[str, ...],
    zero_point_name: str | None,
    axis: int,
    rank: int,
) -> Quantization:
    """The Quantization of stored integers of rank `rank`: scale the product of the
    `scale_names` constants, per channel along `axis` when it is a vector."""
    stored = index.constant_tensor(stored_name)
    scales = [numpy_helper.to_array(index.constant_tensor(name)) for name in scale_names]
    scale = np.ones(())
    for factor in scales:  # a scalar input scale times per-channel weight scales
        scale = scale * factor.astype(np.float64)
    zero = None
    if zero_point_name:
        zero = numpy_helper.to_array(index.constant_tensor(zero_point_name))
    per_channel = scale.ndim == 1 and scale.size > 1
    return Quantization(
        # A product of scales is no tensor of its own: it is kept as it is, never grown.
        scale_name=scale_names[0] if len(scale_names) == 1 else None,
        scale=scale,
        scale_dtype=scales[-1].dtype,
        zero_point=(
            np.zeros_like(scale, np.int64)
            if zero is None
            else zero.astype(np.int64).reshape(scale.shape)
        ),
        axis=axis % rank if per_channel else None,
        stored_dtype=np.dtype(helper.tensor_dtype_to_np_dtype(stored.data_type)),
    )
