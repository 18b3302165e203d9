"""onnxruntime sessions (CUDA where it really starts, else the CPU) and batched runs."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from .cores import usable_cores
from .errors import InputError, UnsupportedModelError
from .gram import GramUpdate, numpy_gram_update
from .modelio import all_tensors

CPU = "CPUExecutionProvider"
OUTPUT_COPIES = 3  # batches of a run's outputs that may be alive at once (Runner._fit_batch)
CUDA = "CUDAExecutionProvider"
CUDA_OPTIONS = {
    # TF32 would round conv and matmul inputs to 10 bits: the CUDA run must match the CPU's.
    "use_tf32": "0",
    # cuDNN's conv algorithm chosen by shape, not by timing runs (onnxruntime's default):
    # the same inputs must give the same bytes on every run.
    "cudnn_conv_algo_search": "HEURISTIC",
}
# onnxruntime's own log level for our sessions: 4 = fatal only (its errors become ours).
ORT_SILENT = 4
# The small models this module builds: old enough for any onnxruntime it supports.
HELPER_OPSET = 13
HELPER_IR_VERSION = 7

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
# How onnxruntime names the newest IR version it reads when a model is newer.
NEWEST_IR_MESSAGE = re.compile(r"max supported IR version: ([0-9]+)")
# The IR version that introduced each element type newer than IR 4 (onnx.proto's history),
# by element type number; types this onnx does not define are left out.
TYPE_IR_VERSIONS = {
    getattr(onnx.TensorProto, name): version
    for version, names in {
        9: ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ"),
        10: ("UINT4", "INT4"),
        11: ("FLOAT4E2M1",),
        12: ("FLOAT8E8M0",),
        13: ("UINT2", "INT2"),
        14: ("FLOAT6E2M3", "FLOAT6E3M2"),
    }.items()
    for name in names
    if hasattr(onnx.TensorProto, name)
}


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
    # Run the next batch while the caller uses this one: on CUDA, where the GPU is free.
    runs_ahead: bool = False
    # Bytes a batch's outputs may take, OUTPUT_COPIES times over: the first run, of one
    # sample, measures them and shrinks `batch_size` to fit (not for a fixed batch).
    memory_budget: int | None = None
    batch_reason: str = "--batch-size"  # why `batch_size` is what it is
    _sized: bool = field(default=False, init=False, repr=False)
    _cuda_gram: GramUpdate | None = field(default=None, init=False, repr=False)
    _switching: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

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

        A worker thread prepares the next batch while the caller uses this one: it loads
        the samples (two batches of inputs are then alive) and, while the runner
        `runs_ahead`, runs them too (two batches of outputs). A fixed-batch model gets its
        last batch padded with copies of the first sample, cut from every output before it
        is yielded. Under a memory budget, the first run ever is of one sample, to size the
        batches; its outputs are dropped, so batches are cut the same way whatever memory
        there is (statistics collected in parts then add up to the same float32 sums).
        """
        if self.memory_budget and not self.fixed_batch and not self._sized and len(indices):
            outputs = self._outputs(output_names, load(indices[:1]), 1)
            self._fit_batch(sum(output.nbytes for output in outputs))
            del outputs
        size = self.batch_size
        batches = [indices[start : start + size] for start in range(0, len(indices), size)]

        def prepare(batch: np.ndarray) -> tuple[np.ndarray | None, list[np.ndarray] | None]:
            inputs = load(batch)
            if not self.runs_ahead:
                return inputs, None
            return None, self._outputs(output_names, inputs, len(batch))

        worker = ThreadPoolExecutor(max_workers=1)
        try:
            upcoming = worker.submit(prepare, batches[0]) if batches else None
            for number, batch in enumerate(batches):
                inputs, outputs = upcoming.result()
                if number + 1 < len(batches):
                    upcoming = worker.submit(prepare, batches[number + 1])
                if outputs is None:
                    outputs = self._outputs(output_names, inputs, len(batch))
                del inputs
                yield batch, outputs
                del outputs  # not alive while the next batch runs
        finally:  # an error or an early stop does not wait for the batch being prepared
            worker.shutdown(wait=False, cancel_futures=True)

    def _fit_batch(self, bytes_per_sample: int) -> None:
        """Shrink the batch so that, over the memory this process uses now,
        OUTPUT_COPIES batches of outputs fit in the budget: onnxruntime's working tensors,
        the outputs handed over, and the batch prepared after them."""
        self._sized = True

        def fitting(in_use: int) -> int:
            room = max(0, self.memory_budget - in_use)
            return max(1, room // (OUTPUT_COPIES * max(1, bytes_per_sample)))

        in_use = memory_in_use()
        if fitting(in_use) < self.batch_size:
            # Memory freed but kept by the C allocator counts until it is handed back:
            # building the tapped model frees the model's size twice over, and ViT-B/16's
            # batches were sized against 317 MiB that glibc still held (1 sample, not 4).
            # Only then, as pages handed back are faulted in again when next used
            # (ResNet-18, whose batch fits anyway: 0.25 s more collection).
            _release_freed_heap()
            in_use = memory_in_use()
        fits = fitting(in_use)
        if fits >= self.batch_size:
            return
        self.batch_reason = (
            f"--max-memory {self.memory_budget / 2**20:.0f} MiB: {in_use / 2**20:.0f} MiB in "
            f"use, then {OUTPUT_COPIES} batches of {bytes_per_sample / 2**20:.1f} MiB of "
            "outputs per sample"
        )
        self.batch_size = int(fits)

    def gram_update(self, rows: np.ndarray, sums: np.ndarray) -> None:
        """Add `rows[g]^T rows[g]` of float32 rows into `sums[g]` (its lower triangle at
        least, as `GramUpdate` asks): on the GPU while the session runs on CUDA (these
        products outweigh the forward pass itself, ResNet-18: 1.0e12 multiply-adds against
        1.7e11), else numpy's. Under `auto`, a CUDA failure here also moves the run to the
        CPU."""
        if self.provider == CUDA:
            try:
                if self._cuda_gram is None:
                    self._cuda_gram = onnxruntime_gram(CUDA)
                self._cuda_gram(rows, sums)
                return
            except UnsupportedModelError as error:
                if not self._give_up_cuda(str(error)):
                    raise
        numpy_gram_update(rows, sums)

    def _outputs(self, output_names: list[str] | None, inputs: np.ndarray, real: int):
        """One batch through the session, padded to the fixed batch size where there is one;
        under `auto`, a CUDA failure moves the run to the CPU."""
        padding = self.batch_size - real if self.fixed_batch else 0
        if padding:
            inputs = np.concatenate([inputs, np.repeat(inputs[:1], padding, axis=0)])
        while True:
            session = self.session
            try:
                outputs = self._session_outputs(session, output_names, inputs)
                break
            except ORT_ERRORS as error:
                provider = session.get_providers()[0]
                message = f"onnxruntime ({provider}) failed to run the model: "
                message += _first_line(error)
                if provider == CPU or not self._give_up_cuda(message):
                    raise UnsupportedModelError(message) from None
        if padding:
            outputs = [_drop_padding(o, real, self.batch_size) for o in outputs]
        return outputs

    def _give_up_cuda(self, reason: str) -> bool:
        """Under `auto`, move to a CPU session (once, whichever thread fails first);
        whether the run is now on the CPU."""
        with self._switching:
            if self.provider == CPU:
                return True
            if self.cpu_fallback is None:
                return False
            self.session, self.cpu_fallback = self.cpu_fallback(), None
            self.cuda_failure, self.runs_ahead = reason, False
            return True

    def _session_outputs(self, session, output_names: list[str] | None, inputs: np.ndarray):
        """On CUDA through IO binding: the outputs stay on the GPU until the run ends, then
        each is copied to the host once."""
        if session.get_providers()[0] != CUDA:
            return session.run(output_names, {self.input_name: inputs})
        binding = session.io_binding()
        binding.bind_cpu_input(self.input_name, inputs)
        for name in output_names or [output.name for output in session.get_outputs()]:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


class SampleRows:
    """Per-sample outputs of a run, `[count, ...]`, written batch by batch into one array
    sized at the first batch: a list of batches joined at the end would hold every row
    twice at that moment. Kept in the outputs' own precision, float32 at least (exact for
    onnxruntime's outputs): float64 would double what a run holds per sample (24 KB, not
    12, on a 1,000-class model with its head's features), so arithmetic on them widens
    where it needs to."""

    def __init__(self, count: int):
        self.count = count
        self.rows: np.ndarray | None = None
        self.filled = 0

    def add(self, values: np.ndarray) -> None:
        if self.rows is None:
            dtype = np.result_type(values.dtype, np.float32)
            self.rows = np.empty((self.count, *values.shape[1:]), dtype=dtype)
        self.rows[self.filled : self.filled + len(values)] = values
        self.filled += len(values)

    def result(self) -> np.ndarray:
        """The rows written (`[0, 0]` when there were none)."""
        return np.zeros((0, 0)) if self.rows is None else self.rows[: self.filled]


def _drop_padding(output: np.ndarray, real: int, padded: int) -> np.ndarray:
    """Keep the rows of real samples: batch-major outputs hold `rows / padded` per sample."""
    if output.ndim == 0 or output.shape[0] % padded:
        raise UnsupportedModelError(
            f"cannot tell the samples apart in an output of shape {list(output.shape)} "
            "of a fixed-batch model"
        )
    return output[: real * (output.shape[0] // padded)]


def memory_in_use() -> int:
    """The resident memory of this process now, in bytes: from /proc on Linux, else the
    most it has used so far (0 where the platform says neither). Not the peak where it
    can be helped: an earlier run's peak would starve every later run in the process.
    Memory freed but kept by the C allocator is counted (`_release_freed_heap`)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, where the C library is glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not Linux, or not glibc
        return None


def _release_freed_heap() -> None:
    """Give the memory the C allocator keeps of what was freed back to the system."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def open_runner(
    model: onnx.ModelProto | bytes | str,
    device: str,
    batch_size: int,
    fixed_batch: int | None,
    input_name: str,
    memory_budget: int | None = None,
) -> Runner:
    """Start a session on the requested device; `auto` uses CUDA only if it really starts."""
    payload = session_payload(model) if isinstance(model, onnx.ModelProto) else model
    options = session_options()

    def cpu_session() -> ort.InferenceSession:
        return _session(payload, options, CPU)

    session, cuda_failure = None, None
    if device in ("auto", "cuda") and cuda_starts():
        try:
            session = _session(payload, options, CUDA)
        except UnsupportedModelError as error:
            if device == "cuda":
                raise
            cuda_failure = str(error)
    if session is None:
        if device == "cuda":
            raise InputError(
                "device cuda: the CUDA provider of onnxruntime did not start", ("device",)
            )
        session = cpu_session()
    on_cuda = session.get_providers()[0] == CUDA
    return Runner(
        session=session,
        input_name=input_name,
        batch_size=fixed_batch or batch_size,
        fixed_batch=fixed_batch is not None,
        cpu_fallback=cpu_session if device == "auto" and on_cuda else None,
        cuda_failure=cuda_failure,
        runs_ahead=on_cuda,
        memory_budget=memory_budget,
        batch_reason="the model's fixed batch" if fixed_batch else "--batch-size",
    )


def session_options() -> ort.SessionOptions:
    """Every graph optimisation is on: onnxruntime never fuses away a tensor that is a graph
    output, so tapped tensors keep their exported values. Memory patterns are off: once a
    batch shape repeats, onnxruntime would allocate the whole recorded plan as one block,
    rounded up by its arena (ResNet-18 at 1,000 samples: peak 2920 MiB with them, 2473
    without, at the same speed).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = ORT_SILENT  # its errors become ours, on one line
    # One thread per core this process may use (affinity, cgroup quota), and no spinning:
    # between runs the host does Gram products, and waiting threads that spin take the
    # cores from them and from any other process on the machine.
    options.intra_op_num_threads = usable_cores()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Same inputs and seed, same model bytes: no kernel may pick its algorithm by timing.
    options.use_deterministic_compute = True
    options.enable_mem_pattern = False
    return options


@functools.cache
def cuda_starts() -> bool:
    """Whether onnxruntime's CUDA provider really starts here (asked once per process).

    A CUDA build lists the provider even where its libraries or the GPU are missing; the
    only test is to start a session.
    """
    if CUDA not in ort.get_available_providers():
        return False
    try:
        probe = ort.InferenceSession(_probe_model(), _quiet(), **session_providers(CUDA))
        return probe.get_providers()[0] == CUDA
    except ORT_ERRORS:
        return False


def quiet_onnxruntime() -> None:
    """For the command line only: onnxruntime logs nothing to stderr, where each error is
    one line of ours. A library user's process keeps its own setting."""
    ort.set_default_logger_severity(ORT_SILENT)


@functools.cache
def newest_ir_version() -> int:
    """The newest ONNX IR version this onnxruntime reads (asked once per process)."""
    probe = onnx.ModelProto()
    probe.ParseFromString(_probe_model())
    probe.ir_version = onnx.IR_VERSION
    try:
        ort.InferenceSession(probe.SerializeToString(), _quiet(), providers=[CPU])
    except ORT_ERRORS as error:
        found = NEWEST_IR_MESSAGE.search(str(error))
        if found:
            return int(found.group(1))
    return onnx.IR_VERSION


def session_payload(model: onnx.ModelProto) -> bytes:
    """The model's bytes as onnxruntime is given them.

    A model saved with a newer IR version than onnxruntime reads, but using nothing that
    version added, runs with its IR version lowered; the model itself keeps its own.
    """
    data = model.SerializeToString()
    return data + ir_override(model)


def ir_override(model: onnx.ModelProto) -> bytes:
    """Bytes that, appended to the serialised model, lower its IR version to what
    onnxruntime reads (nothing when it already does).

    Protobuf merges concatenated messages, the last value of a field winning, so the
    model itself is neither copied nor changed.
    """
    readable = newest_ir_version()
    if model.ir_version <= readable:
        return b""
    newer = _newer_than(model, readable)
    if newer:
        raise UnsupportedModelError(
            f"the model has IR version {model.ir_version} and uses {newer}, but onnxruntime "
            f"{ort.__version__} reads IR {readable} at most; upgrade onnxruntime"
        )
    return onnx.ModelProto(ir_version=readable).SerializeToString()


def _newer_than(model: onnx.ModelProto, ir_version: int) -> str | None:
    """What the model uses that IR `ir_version` lacks: an opset or an element type."""
    newest_opset = max(row[2] for row in helper.VERSION_TABLE if row[1] <= ir_version)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest_opset:
            return f"opset {opset.version}"
    types = [tensor.data_type for tensor in all_tensors(model)]
    graph = model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        types.append(value.type.tensor_type.elem_type)
    for node in graph.node:
        types += [a.i for a in node.attribute if a.name == "to" and a.type == a.INT]
    for data_type in types:
        if TYPE_IR_VERSIONS.get(data_type, 0) > ir_version:
            return f"element type {onnx.TensorProto.DataType.Name(data_type)}"
    return None


def _quiet() -> ort.SessionOptions:
    """Options of a probe session: its failure is an answer, not a message."""
    options = ort.SessionOptions()
    options.log_severity_level = ORT_SILENT
    return options


def _probe_model() -> bytes:
    """The smallest model: one Identity, enough to start a session."""
    value = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [value],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    return _helper_model(graph)


def _session(payload, options, provider: str) -> ort.InferenceSession:
    try:
        session = ort.InferenceSession(payload, options, **session_providers(provider))
    except ORT_ERRORS as error:
        raise UnsupportedModelError(
            f"onnxruntime ({provider}) cannot load the model: {_first_line(error)}"
        ) from None
    # A provider failing in a run is the Runner's to handle (`cpu_fallback`), not
    # onnxruntime's own fallback, which prints to stdout and starts the session again from
    # the model's bytes. Without it those bytes, which its Python session keeps for good,
    # are dead weight: the model's size again (330 MB on ViT-B/16) for as long as the
    # session lives.
    session.disable_fallback()
    if getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None
    return session


def session_providers(provider: str) -> dict:
    """A session's providers and their options: on CUDA, operators without a CUDA kernel
    still run, on the CPU."""
    if provider == CUDA:
        return {"providers": [CUDA, CPU], "provider_options": [CUDA_OPTIONS, {}]}
    return {"providers": [CPU]}


def onnxruntime_gram(provider: str) -> GramUpdate:
    """`sums[g] += rows[g]^T rows[g]` for float32 rows `[groups, n, d]`, the products by
    onnxruntime on `provider`."""
    session = _session(_gram_model(), session_options(), provider)

    def update(rows: np.ndarray, sums: np.ndarray) -> None:
        try:
            # onnxruntime takes C-ordered arrays only: a grouped layer's rows, a
            # transposed view of its `[groups, d, n]` patches, are copied once here.
            sums += session.run(None, {"rows": np.ascontiguousarray(rows)})[0]
        except ORT_ERRORS as error:
            raise UnsupportedModelError(
                f"onnxruntime ({provider}) failed on a Gram matrix: {_first_line(error)}"
            ) from None

    return update


def _gram_model() -> bytes:
    """`gram[g] = rows[g]^T rows[g]` for float32 `rows` of shape `[groups, n, d]`."""
    rows = helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, ["g", "n", "d"])
    gram = helper.make_tensor_value_info("gram", onnx.TensorProto.FLOAT, ["g", "d", "d"])
    nodes = [
        helper.make_node("Transpose", ["rows"], ["columns"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["columns", "rows"], ["gram"]),
    ]
    return _helper_model(helper.make_graph(nodes, "gram", [rows], [gram]))


def _helper_model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", HELPER_OPSET)])
    model.ir_version = HELPER_IR_VERSION
    return model.SerializeToString()
