"""onnxruntime sessions (CUDA where it really starts, else the CPU) and batched runs."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import click
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from .errors import InputError, UnsupportedModelError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# onnxruntime's own log levels: 3 = errors only, 4 = fatal only.
ORT_QUIET = 3
ORT_SILENT = 4
# Old enough for any onnxruntime this package supports.
PROBE_OPSET = 13
PROBE_IR_VERSION = 7

# onnxruntime's errors share no base class of their own.
ORT_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.NoModel,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
    ort_state.EPFail,
    RuntimeError,
    ValueError,
)

ort.set_default_logger_severity(ORT_QUIET)


@dataclass
class Runner:
    """A session and the batch size it runs at (the model's own when that is fixed)."""

    session: ort.InferenceSession
    input_name: str
    batch_size: int
    fixed_batch: bool
    # `--device auto` on CUDA: how to start a CPU session if CUDA fails on this model.
    cpu_fallback: Callable[[], ort.InferenceSession] | None = None
    cuda_failure: str | None = None  # why CUDA was given up for this model

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def provider_note(self) -> str | None:
        """Why the session is not on CUDA although this onnxruntime lists the provider."""
        if self.cuda_failure is not None:
            return f"{self.cuda_failure}; ran on the CPU instead"
        if self.provider != CUDA and CUDA in ort.get_available_providers():
            return "the CUDA provider of onnxruntime did not start; ran on the CPU"
        return None

    def run(
        self,
        load: Callable[[np.ndarray], np.ndarray],
        indices: np.ndarray,
        output_names: list[str] | None = None,
    ) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """Yield `(batch_indices, outputs)` over `indices`, loading each batch on demand.

        A fixed-batch model gets its last batch padded with copies of the first sample;
        the padding rows are cut from every output before it is yielded.
        """
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            inputs = load(batch)
            padding = self.batch_size - len(batch) if self.fixed_batch else 0
            if padding:
                inputs = np.concatenate([inputs, np.repeat(inputs[:1], padding, axis=0)])
            outputs = self._outputs(output_names, {self.input_name: inputs})
            if padding:
                outputs = [_drop_padding(o, len(batch), self.batch_size) for o in outputs]
            yield batch, outputs
            del inputs, outputs  # not alive while the next batch runs: memory is one batch

    def _outputs(self, output_names: list[str] | None, feed: dict) -> list[np.ndarray]:
        """One batch through the session; under `auto`, a CUDA failure moves to the CPU."""
        while True:
            try:
                return self.session.run(output_names, feed)
            except ORT_ERRORS as error:
                message = f"onnxruntime ({self.provider}) failed to run the model: "
                message += _first_line(error)
                if self.cpu_fallback is None or self.provider == CPU:
                    raise UnsupportedModelError(message) from None
                self.session, self.cpu_fallback = self.cpu_fallback(), None
                self.cuda_failure = message


def _drop_padding(output: np.ndarray, real: int, padded: int) -> np.ndarray:
    """Keep the rows of real samples: batch-major outputs hold `rows / padded` per sample."""
    if output.ndim == 0 or output.shape[0] % padded:
        raise UnsupportedModelError(
            f"cannot tell the samples apart in an output of shape {list(output.shape)} "
            "of a fixed-batch model"
        )
    return output[: real * (output.shape[0] // padded)]


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def open_runner(
    model: onnx.ModelProto | bytes | str,
    device: str,
    batch_size: int,
    fixed_batch: int | None,
    input_name: str,
) -> Runner:
    """Start a session on the requested device; `auto` uses CUDA only if it really starts.

    Every graph optimisation is on: onnxruntime never fuses away a tensor that is a graph
    output, so tapped tensors keep their exported values. Memory patterns are off: once a
    batch shape repeats, onnxruntime would allocate the whole recorded plan as one block,
    rounded up by its arena (ResNet-18 at 1,000 samples: peak 2920 MiB with them, 2473
    without, at the same speed).
    """
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = ORT_SILENT  # its errors become ours, on one line
    # Same inputs and seed, same model bytes: no kernel may pick its algorithm by timing.
    options.use_deterministic_compute = True
    options.enable_mem_pattern = False

    def cpu_session() -> ort.InferenceSession:
        return _session(payload, options, [CPU])

    session, cuda_failure = None, None
    if device in ("auto", "cuda") and cuda_starts():
        try:
            session = _session(payload, options, [CUDA, CPU])
        except UnsupportedModelError as error:
            if device == "cuda":
                raise
            cuda_failure = str(error)
    if session is None:
        if device == "cuda":
            raise InputError("--device cuda: the CUDA provider of onnxruntime did not start")
        session = cpu_session()
    on_cuda = session.get_providers()[0] == CUDA
    return Runner(
        session=session,
        input_name=input_name,
        batch_size=fixed_batch or batch_size,
        fixed_batch=fixed_batch is not None,
        cpu_fallback=cpu_session if device == "auto" and on_cuda else None,
        cuda_failure=cuda_failure,
    )


@functools.cache
def cuda_starts() -> bool:
    """Whether onnxruntime's CUDA provider really starts here (asked once per process).

    A CUDA build lists the provider even where its libraries or the GPU are missing; the
    only test is to start a session, with onnxruntime's own logging silenced meanwhile.
    """
    if CUDA not in ort.get_available_providers():
        return False
    ort.set_default_logger_severity(ORT_SILENT)
    try:
        probe = ort.InferenceSession(_probe_model(), providers=[CUDA, CPU])
        started = probe.get_providers()[0] == CUDA
    except ORT_ERRORS:
        started = False
    finally:
        ort.set_default_logger_severity(ORT_QUIET)
    return started


def _probe_model() -> bytes:
    """The smallest model: one Identity, enough to start a session."""
    value = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [value],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", PROBE_OPSET)])
    model.ir_version = PROBE_IR_VERSION
    return model.SerializeToString()


def _session(payload, options, providers) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(payload, options, providers=providers)
    except ORT_ERRORS as error:
        raise UnsupportedModelError(
            f"onnxruntime ({providers[0]}) cannot load the model: {_first_line(error)}"
        ) from None


class _NoProgress:
    def update(self, steps: int) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, label: str, wanted: bool):
    """A progress bar on stderr when wanted and stderr is a terminal, else nothing."""
    if not (wanted and sys.stderr.isatty()):
        yield _NoProgress()
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar
