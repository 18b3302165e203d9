"""The model's data input and class-score output: what samples must look like."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .errors import UnsupportedModelError

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


@dataclass(frozen=True)
class Signature:
    """The one data input (`shape` dims are ints or None where symbolic) and the scores."""

    input_name: str
    input_shape: tuple[int | None, ...]
    input_dtype: np.dtype
    scores_name: str
    class_count: int | None

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was exported with, when it is not symbolic."""
        return self.input_shape[0] if self.input_shape else None


def _dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


def read_signature(model: onnx.ModelProto, scores_name: str | None = None) -> Signature:
    """Find the single data input and the `[N, classes]` float scores output."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise UnsupportedModelError(
            f"the model must have exactly one data input, it has {len(inputs)} ({names})"
        )
    data_input = inputs[0]
    input_type = data_input.type.tensor_type
    if not data_input.type.HasField("tensor_type") or input_type.elem_type == 0:
        raise UnsupportedModelError(f"input {data_input.name!r} is not a typed tensor")
    input_shape = _dims(data_input)
    if not input_shape:
        raise UnsupportedModelError(f"input {data_input.name!r} has no known rank")
    scores = _scores_output(model, scores_name)
    scores_dims = _dims(scores) or (None, None)
    return Signature(
        input_name=data_input.name,
        input_shape=input_shape,
        input_dtype=np.dtype(helper.tensor_dtype_to_np_dtype(input_type.elem_type)),
        scores_name=scores.name,
        class_count=scores_dims[1],
    )


def _holds_scores(output: onnx.ValueInfoProto) -> bool:
    """A float tensor of rank 2, or of a rank the model does not declare."""
    dims = _dims(output)
    return output.type.tensor_type.elem_type in FLOAT_TYPES and (dims is None or len(dims) == 2)


def _scores_output(model: onnx.ModelProto, name: str | None) -> onnx.ValueInfoProto:
    outputs = list(model.graph.output)
    if name is not None:
        chosen = [o for o in outputs if o.name == name]
        if not chosen:
            available = ", ".join(o.name for o in outputs)
            raise UnsupportedModelError(
                f"output_name {name!r} is not an output (have: {available})", ("output_name",)
            )
        if not _holds_scores(chosen[0]):
            raise UnsupportedModelError(
                f"output_name {name!r} is not float [N, classes] scores; name the scores output",
                ("output_name",),
            )
        return chosen[0]
    for output in outputs:
        if _holds_scores(output):
            return output
    raise UnsupportedModelError(
        "no output holds [N, classes] float scores; name one with output_name NAME",
        ("output_name",),
    )
