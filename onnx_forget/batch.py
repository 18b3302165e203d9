"""Fixed-batch models at full speed: a copy of the graph with its batch dimension made
symbolic runs the samples in large batches, once it has given the original's outputs.

Batch-1 exports are common for edge targets; run one sample at a time, the tapped model
spends most of its time per call rather than per sample. The written model keeps the
original signature: only the sessions of a run use the copy.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from .runtime import CPU, ORT_ERRORS, session_options, session_payload
from .signature import Signature

BATCH_DIMENSION = "batch"
CHECK_SEED = 0
CHECK_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}  # float32 sums in another order


def symbolic_batch(model: onnx.ModelProto, signature: Signature) -> onnx.ModelProto:
    """A copy of `model` whose data input and outputs have a symbolic first dimension
    where they had the fixed batch, with no recorded intermediate shapes."""
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(model)
    graph = relaxed.graph
    values = [v for v in graph.input if v.name == signature.input_name] + list(graph.output)
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == signature.fixed_batch:
            dims[0].dim_param = BATCH_DIMENSION
    del graph.value_info[:]
    return relaxed


def batch_check(model: onnx.ModelProto, signature: Signature) -> str | None:
    """Why the model's batch dimension cannot be made symbolic, or None when it can: the
    copy, given two seeded random batches as one, must give the original's outputs on
    each, on the CPU."""
    fixed, rest = signature.fixed_batch, signature.input_shape[1:]
    if None in rest:
        return "its input has other symbolic dimensions"
    rng = np.random.default_rng(CHECK_SEED)
    halves = [rng.standard_normal((fixed, *rest)).astype(signature.input_dtype) for _ in range(2)]
    try:
        original = _session(model)
        relaxed = _session(symbolic_batch(model, signature))
        expected = [original.run(None, {signature.input_name: half}) for half in halves]
        doubled = relaxed.run(None, {signature.input_name: np.concatenate(halves)})
    except ORT_ERRORS as error:
        return f"run at batch {2 * fixed}, onnxruntime fails ({str(error).splitlines()[0]})"
    for number, output in enumerate(doubled):
        parts = np.concatenate([outputs[number] for outputs in expected])
        if output.shape != parts.shape or not np.allclose(output, parts, **CHECK_TOLERANCE):
            return f"run at batch {2 * fixed}, its output {number} differs from the original's"
    return None


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(session_payload(model), session_options(), providers=[CPU])
