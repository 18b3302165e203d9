"""Check a written model: ONNX checker, onnxruntime loads it, same inputs and outputs."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from .errors import VerificationError
from .runtime import CPU, ORT_ERRORS


def same_interface(original: onnx.ModelProto, candidate: onnx.ModelProto) -> list[str]:
    """What differs in inputs, outputs, opsets and IR version; empty when nothing does."""
    problems = []
    for part in ("input", "output"):
        before = [v.SerializeToString() for v in getattr(original.graph, part)]
        after = [v.SerializeToString() for v in getattr(candidate.graph, part)]
        if before != after:
            problems.append(f"graph {part}s changed")
    if list(original.opset_import) != list(candidate.opset_import):
        problems.append("opset imports changed")
    if original.ir_version != candidate.ir_version:
        problems.append("IR version changed")
    return problems


def verify_file(path: Path, original: onnx.ModelProto) -> None:
    """Raise VerificationError unless the file at `path` is a sound copy of `original`'s API."""
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as error:
        raise VerificationError(f"the rewritten model fails the ONNX checker: {error}") from None
    written = onnx.load(str(path), load_external_data=False)
    problems = same_interface(original, written)
    if problems:
        raise VerificationError(f"the rewritten model's {'; '.join(problems)}")
    try:
        ort.InferenceSession(str(path), providers=[CPU])
    except ORT_ERRORS as error:
        raise VerificationError(f"onnxruntime cannot load the rewritten model: {error}") from None


def verify_model(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The in-memory form of `verify_file`, for results that are not written."""
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as error:
        raise VerificationError(f"the rewritten model fails the ONNX checker: {error}") from None
    problems = same_interface(original, model)
    if problems:
        raise VerificationError(f"the rewritten model's {'; '.join(problems)}")
