"""Checks that a rewritten model is valid ONNX, loads in onnxruntime, and keeps the
same inputs and outputs."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from .errors import UnsupportedModelError, VerificationError
from .modelio import checker_problem
from .outputs import STAGING_PREFIX
from .runtime import CPU, ORT_ERRORS, ir_override


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
    """Raise VerificationError unless the file at `path` is a sound copy of `original`'s API.

    A model newer than onnxruntime reads is loaded from a copy beside it with its IR
    version lowered (`runtime.ir_override`), so its external data is found the same way.
    """
    _check(str(path), original, onnx.load(str(path), load_external_data=False))
    try:
        override = ir_override(original)
    except UnsupportedModelError as error:
        raise VerificationError(f"onnxruntime cannot load the rewritten model: {error}") from None
    runnable = path
    if override:
        runnable = path.with_name(f"{STAGING_PREFIX}runtime-{path.name}")
        runnable.write_bytes(path.read_bytes() + override)
    try:
        ort.InferenceSession(str(runnable), providers=[CPU])
    except ORT_ERRORS as error:
        raise VerificationError(f"onnxruntime cannot load the rewritten model: {error}") from None
    finally:
        if runnable != path:
            runnable.unlink(missing_ok=True)


def verify_model(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The in-memory form of `verify_file`, for results that are not written."""
    _check(model, original, model)


def _check(checked, original: onnx.ModelProto, written: onnx.ModelProto) -> None:
    problem = checker_problem(checked)
    if problem is not None:
        raise VerificationError(f"the rewritten model fails the ONNX checker: {problem}")
    problems = same_interface(original, written)
    if problems:
        raise VerificationError(f"the rewritten model's {'; '.join(problems)}")
