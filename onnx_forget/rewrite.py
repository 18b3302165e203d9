"""Write the projected weights into a copy of the model; nothing else changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import DEQUANTIZE, GraphIndex, PassThroughStep, WeightSource, pass_through_steps
from .layer_scan import CONV, IN_OUT, OUT_IN, Layer
from .subspace import Projection

WEIGHT_INPUT = 1  # Conv, Gemm and MatMul all read their weight as input 1
BIAS_INPUT = 2  # and Conv and Gemm their bias as input 2


def project_weight(weight: np.ndarray, layer: Layer, projection: Projection) -> np.ndarray:
    """The layer's weight (as the layer sees it) with its input side projected.

    `projection` applies `P` to `[groups, d, k]` column blocks. Viewed as `W` `[out, d]`
    per group the update is `W' = W P^T = (P W^T)^T`; a weight stored `[K, N]`
    (`y = x B`) is `W^T`, so it becomes `B' = P B`.
    """
    if layer.orientation == CONV:
        out = weight.shape[0]
        per_group = weight.reshape(layer.groups, out // layer.groups, layer.input_size)
        return projection(per_group.transpose(0, 2, 1)).transpose(0, 2, 1).reshape(weight.shape)
    if layer.orientation == OUT_IN:
        return projection(weight.T[None])[0].T
    if layer.orientation == IN_OUT:
        return projection(weight[None])[0]
    raise ValueError(f"unknown orientation {layer.orientation!r}")


class WeightEditor:
    """Edits one copy of the model: constant values, and copies of shared constants."""

    def __init__(self, model: onnx.ModelProto):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        graph = self.model.graph
        # The graph as it was: the chains of the weights, which a private copy repeats.
        self.index = GraphIndex(graph)
        self.node_by_name = dict(self.index.node_by_name)
        self.initializers = dict(self.index.initializers)
        self.constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        self.inserted: dict[int, list[onnx.NodeProto]] = {}
        self.orphan_candidates: set[str] = set()  # shared weights whose readers got copies
        self.taken = {name for node in graph.node for name in node.output} | set(self.initializers)
        self.own_scales: dict[str, str] = {}  # a private copy -> its own dequantization scale
        self.rescaled_channels = 0  # quantized weight channels whose scale had to grow

    def stored(self, name: str) -> onnx.TensorProto:
        if name in self.initializers:
            return self.initializers[name]
        return next(a.t for a in self.constants[name].attribute if a.name == "value")

    def edit(
        self,
        source: WeightSource,
        consumer: str,
        position: int,
        private: bool,
        change: Callable[[np.ndarray], np.ndarray],
        bias: tuple[int, int, bool] | None = None,
    ) -> str | None:
        """Replace a stored constant by `change` of its value as `consumer` sees it.

        `change` gets and returns the value after the pass-through chain, in float64; the
        result is carried back through the chain and stored in the constant's own dtype,
        quantized again where the chain dequantized it. With `private`, the consumer's
        input `position` first gets its own copy; returns the copy's name then. `bias`
        (`bias_of` the layer) keeps a quantized bias on input scale x weight scale when
        weight scales grow.
        """
        stored_name, copy_name = source.tensor, None
        if private:
            chain = [self.node_by_name[n] for n in source.chain]
            stored_name = copy_name = self._own_copy(consumer, position, stored_name, chain)
        tensor = self.stored(stored_name)
        stored = numpy_helper.to_array(tensor)
        steps = pass_through_steps(self.index, source)  # a copy's chain has the same steps
        changed = change(_through(stored, steps))
        for step in reversed(steps):
            changed = step.backward(changed)
        quantization = steps[0].quantization if steps else None
        if quantization is None:
            tensor.CopyFrom(numpy_helper.from_array(changed.astype(stored.dtype), tensor.name))
            return copy_name
        integers, scale = quantization.quantize(changed)
        tensor.CopyFrom(numpy_helper.from_array(integers, tensor.name))
        growth = scale / quantization.scale  # 1 where a channel kept its scale
        if np.any(growth != 1):
            scale_name = self.own_scales.get(stored_name, quantization.scale_name)
            self._write(scale_name, scale.astype(quantization.scale_dtype))
            self.rescaled_channels += int(np.count_nonzero(growth != 1))
            if bias is not None and len(steps) == 1:  # stored as the layer sees it
                self._rescale_bias(consumer, bias, quantization.axis, growth)
        return copy_name

    def _rescale_bias(
        self, consumer: str, bias: tuple[int, int, bool], axis: int | None, growth: np.ndarray
    ) -> None:
        """Keep an int32 bias dequantized with input scale x weight scale on that product
        after weight scales grew by `growth`: its scale grows alike (where it is a tensor
        of its own), its integers shrink, its float values stay."""
        position, output_axis, scaled_by_layer = bias
        node = self.node_by_name[consumer]
        if axis not in (None, output_axis) or len(node.input) <= position:
            return
        if scaled_by_layer:
            name = node.input[position]
            stored = numpy_helper.to_array(self.stored(name))
            self._write(name, np.rint(stored / growth.reshape(-1)).astype(stored.dtype))
            return
        source = self.index.trace_weight(node.input[position])
        if isinstance(source, str) or not self.index.is_dequantized(source):
            return
        (step,) = pass_through_steps(self.index, source)
        quantization = step.quantization
        if quantization.axis is None and growth.size > 1:
            return  # one bias scale cannot follow per-channel weight scales
        stored = numpy_helper.to_array(self.stored(source.tensor))
        scale = (quantization.scale * growth).astype(quantization.scale_dtype)
        integers = np.rint(stored * quantization.scale / scale.astype(np.float64))
        self._write(source.tensor, integers.astype(stored.dtype))
        self._write(quantization.scale_name, scale)

    def _write(self, name: str, value: np.ndarray) -> None:
        """Replace the value of the stored constant `name`."""
        tensor = self.stored(name)
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))

    def seen(self, source: WeightSource) -> np.ndarray:
        """A stored constant's value as its consumer sees it, in float64."""
        stored = numpy_helper.to_array(self.stored(source.tensor))
        return _through(stored, pass_through_steps(self.index, source))

    def _own_copy(self, consumer: str, position: int, source: str, chain: list[onnx.NodeProto]):
        """Give one consumer a private copy of a shared stored constant and of its chain."""
        # A dequantization's scale may change with the weight: it is copied too.
        scales = [node.input[1] for node in chain if node.op_type == DEQUANTIZE]
        renamed = {
            name: self._fresh_name(f"{name}.{consumer}")
            for name in [source, *scales] + [node.output[0] for node in chain]
        }
        new_nodes = []
        for name in [source, *scales]:
            if name in self.initializers:
                copy = self.model.graph.initializer.add()
                copy.CopyFrom(self.initializers[name])
                copy.name = renamed[name]
                self.initializers[copy.name] = copy
            else:
                constant = _clone(self.constants[name], renamed[name], renamed)
                self.constants[constant.output[0]] = constant
                new_nodes.append(constant)
        if scales:
            self.own_scales[renamed[source]] = renamed[scales[0]]
        chain_copy = [
            _clone(
                node,
                self._fresh_name(f"{node.name or node.op_type}.{consumer}"),
                renamed,
            )
            for node in chain
        ]
        new_nodes.extend(chain_copy)
        reader = self.node_by_name[consumer]
        reader.input[position] = renamed[reader.input[position]]
        self.inserted.setdefault(list(self.model.graph.node).index(reader), []).extend(new_nodes)
        self.orphan_candidates.update([source, *scales])
        self.orphan_candidates.update(node.output[0] for node in chain)
        return renamed[source]

    def _fresh_name(self, base: str) -> str:
        name, number = base, 1
        while name in self.taken:
            number += 1
            name = f"{base}.{number}"
        self.taken.add(name)
        return name

    def finish(self, metadata: dict[str, str]) -> onnx.ModelProto:
        """Place copied nodes before their layers, drop what no one reads, set metadata."""
        graph = self.model.graph
        if self.inserted:
            nodes = []
            for position, node in enumerate(graph.node):
                nodes.extend(self.inserted.get(position, []))
                nodes.append(node)
            del graph.node[:]
            graph.node.extend(nodes)
            _drop_unread(graph, self.orphan_candidates)
        props = {p.key: p.value for p in self.model.metadata_props}
        props.update(metadata)
        del self.model.metadata_props[:]
        for key, value in props.items():
            self.model.metadata_props.add(key=key, value=value)
        return self.model


def _through(stored: np.ndarray, steps: list[PassThroughStep]) -> np.ndarray:
    """A stored constant's value after its pass-through steps, in float64."""
    value = stored.astype(np.float64)
    for step in steps:
        value = step.forward(value)
    return value


def _clone(node: onnx.NodeProto, name: str, renamed: dict[str, str]) -> onnx.NodeProto:
    """A copy of a single-output node reading and writing the renamed tensors."""
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    clone.name = name
    for position, tensor in enumerate(clone.input):
        clone.input[position] = renamed.get(tensor, tensor)
    clone.output[0] = renamed[node.output[0]]
    return clone


def _drop_unread(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove shared weights (and their pass-through nodes) that no reader is left for."""
    while True:
        read = {name for node in graph.node for name in node.input}
        read |= {output.name for output in graph.output}
        dead = [n for n in graph.node if n.output[0] in candidates and n.output[0] not in read]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    for tensor in [t for t in graph.initializer if t.name in candidates and t.name not in read]:
        graph.initializer.remove(tensor)


class Rewritten(NamedTuple):
    """A rewritten model, the weight copies made for it, and how many quantized weight
    channels needed a larger scale to hold their new values."""

    model: onnx.ModelProto
    copies: list[str]
    rescaled_channels: int


def rewrite_model(
    model: onnx.ModelProto,
    layers: tuple[Layer, ...],
    projection_of: Callable[[tuple], Projection],
    metadata: dict[str, str],
) -> Rewritten:
    """A copy of `model` with every layer's weight projected by `projection_of(its
    statistic key)`; also the names of copies made and the quantized channels rescaled.

    Layers are taken one statistic at a time, so a lazily built projection is held only
    while its own layers are rewritten.
    """
    editor = WeightEditor(model)
    by_statistic: dict[tuple, list[Layer]] = {}
    for layer in layers:
        by_statistic.setdefault(layer.statistic_key, []).append(layer)
    copies = []
    for key, readers in by_statistic.items():
        copies += _project_readers(editor, readers, projection_of(key))
    return Rewritten(editor.finish(metadata), copies, editor.rescaled_channels)


def bias_of(layer: Layer) -> tuple[int, int, bool] | None:
    """Where a layer reads its bias, its weight's output-channel axis, and whether the
    layer itself scales the bias by input scale x weight scale (an integer layer)."""
    if layer.bias_input is None:
        return None
    return layer.bias_input, layer.output_axis, layer.weight.dequantized_by_layer is not None


def _project_readers(editor: WeightEditor, readers: list[Layer], projection: Projection):
    """Project the weights of the layers reading one statistic; the names of copies made.
    A function of its own so that `projection` is released before the next one is built."""
    copies = []
    for layer in readers:
        copy_name = editor.edit(
            layer.weight,
            layer.node,
            WEIGHT_INPUT,
            layer.shared,
            lambda weight, layer=layer: project_weight(weight, layer, projection),
            bias_of(layer),
        )
        if copy_name:
            copies.append(copy_name)
    return copies
