"""One index of a graph's nodes and constants, and the pass-through chains between a stored
weight and the layer that reads it: what layer discovery reads and the rewrite edits."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Nodes a constant weight may pass through on its way to a layer; each is invertible, so
# the projected weight can be written back into the stored tensor.
WEIGHT_PASSTHROUGH = ("Identity", "Transpose", "Cast", "Reshape")


@dataclass(frozen=True)
class WeightSource:
    """A stored constant and the pass-through nodes between it and the layer.

    `tensor` is an initializer's name or a Constant node's output; `chain` lists the node
    names from the stored tensor to the layer's weight input, in graph order.
    """

    tensor: str
    is_initializer: bool
    chain: tuple[str, ...]


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
            chain.append(self.names[index])
            name = node.input[0]

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
class PassThroughStep:
    """What one pass-through node does to the weight on its way to the layer."""

    op: str
    before: tuple[int, ...]  # the weight's shape entering the node
    after: tuple[int, ...]  # and leaving it
    perm: tuple[int, ...] | None = None  # Transpose's
    dtype: np.dtype | None = None  # Cast's target type

    def forward(self, value: np.ndarray) -> np.ndarray:
        if self.op == "Transpose":
            return value.transpose(self.perm)
        return value.reshape(self.after)  # Reshape; Identity and Cast keep the shape

    def backward(self, value: np.ndarray) -> np.ndarray:
        if self.op == "Transpose":
            return value.transpose(np.argsort(self.perm))
        return value.reshape(self.before)


def pass_through_steps(index: GraphIndex, source: WeightSource) -> list[PassThroughStep]:
    """The steps of `source`'s chain, from the stored tensor to the layer, with shapes."""
    shape = tuple(index.constant_tensor(source.tensor).dims)
    steps = []
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
