"""Fuzz the command line with mutated copies of the fixture model: it must never crash.

Each case runs `python -m onnx_forget` in a fresh process on a mutated copy of
fixtures/mnist_cnn.onnx: protobuf field edits (dims, data types, raw data, attribute
values, node inputs and outputs, op types, opsets, IR version, graph inputs and outputs,
external data references, ...) and byte edits (flips, truncation, splices), one to three
per case, drawn from `--seed`. Few samples are used so a case takes about a second.

A crash is an exit code outside {0, 2, 3, 4}, a traceback on stderr, or a signal; it must
never happen. A broken contract is a refusal that is not one stderr line, an input
model whose bytes changed, or a file left beside it.

    python benchmarks/fuzz_models.py [--cases 300] [--seed 0] [--jobs 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DOCUMENTED_EXITS = {0, 2, 3, 4}
SAMPLES_PER_CLASS = 5  # --retain-per-class and --forget-samples: about a second a case
CASE_TIMEOUT_S = 120
# Each case may not take the machine down with it: its address space is capped.
MEMORY_LIMIT_BYTES = 8 * 2**30
ODD_INTEGERS = (-1, 0, 1, 7, 2**31 - 1, 2**62)
ODD_NAMES = ("", "ghost", "input", "logits", "12.weight", "/2/Relu_output_0", "a\0b")
ODD_OPS = ("Conv", "Gemm", "MatMul", "Relu", "Identity", "Softmax", "Add", "If", "Bogus", "")
ODD_LOCATIONS = ("../x", "/etc/passwd", "model.onnx", "missing.bin", "", "sub/../../x")
DATA_TYPES = (*TensorProto.DataType.values(), 99)
PROTO_SHARE = 0.75  # of mutations that edit fields; the rest edit bytes


@dataclass
class Outcome:
    """What one case did."""

    case: int
    mutations: list[str]
    code: int | None  # None: it ran past CASE_TIMEOUT_S
    stderr: str
    contract: list[str]  # what it broke of the refusal contract
    seconds: float

    @property
    def crashed(self) -> bool:
        return self.code is not None and (
            self.code not in DOCUMENTED_EXITS or "Traceback" in self.stderr
        )


# --- mutations of the parsed model -----------------------------------------------------


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _tensor(model, rng) -> onnx.TensorProto:
    return _pick(rng, model.graph.initializer)


def _dims(model, rng) -> None:
    tensor = _tensor(model, rng)
    action = int(rng.integers(3))
    if action == 0 and tensor.dims:
        tensor.dims[int(rng.integers(len(tensor.dims)))] = _pick(rng, ODD_INTEGERS)
    elif action == 1:
        tensor.dims.append(int(rng.integers(1, 4)))
    else:
        del tensor.dims[:]


def _data_type(model, rng) -> None:
    _tensor(model, rng).data_type = int(_pick(rng, DATA_TYPES))


def _raw_data(model, rng) -> None:
    tensor = _tensor(model, rng)
    if rng.random() < 0.5:
        tensor.raw_data = tensor.raw_data[: int(rng.integers(len(tensor.raw_data) + 1))]
    else:  # random bits: NaN, Inf and denormal weights
        tensor.raw_data = rng.bytes(len(tensor.raw_data))


def _attribute(model, rng) -> None:
    node = _pick(rng, [n for n in model.graph.node if n.attribute] or model.graph.node)
    if not node.attribute or rng.random() < 0.2:
        node.attribute.add(name=_pick(rng, ("group", "pads", "bogus")), type=2, i=-3)
        return
    attribute = _pick(rng, node.attribute)
    action = int(rng.integers(4))
    if action == 0 and attribute.ints:
        attribute.ints[int(rng.integers(len(attribute.ints)))] = _pick(rng, ODD_INTEGERS)
    elif action == 1:
        attribute.i = _pick(rng, ODD_INTEGERS)
    elif action == 2:
        attribute.type = int(_pick(rng, onnx.AttributeProto.AttributeType.values()))
    else:
        node.attribute.remove(attribute)


def _node_input(model, rng) -> None:
    node = _pick(rng, model.graph.node)
    if node.input and rng.random() < 0.7:
        node.input[int(rng.integers(len(node.input)))] = _pick(rng, ODD_NAMES)
    elif node.input:
        del node.input[-1]
    else:
        node.input.append(_pick(rng, ODD_NAMES))


def _node_output(model, rng) -> None:
    node = _pick(rng, model.graph.node)
    node.output[0] = _pick(rng, ODD_NAMES)


def _op_type(model, rng) -> None:
    node = _pick(rng, model.graph.node)
    if rng.random() < 0.8:
        node.op_type = _pick(rng, ODD_OPS)
    else:
        node.domain = "com.bogus"


def _drop_or_repeat_node(model, rng) -> None:
    index = int(rng.integers(len(model.graph.node)))
    if rng.random() < 0.5:
        del model.graph.node[index]
    else:
        model.graph.node.add().CopyFrom(model.graph.node[index])


def _opset(model, rng) -> None:
    action = int(rng.integers(3))
    if action == 0:
        model.opset_import[0].version = int(rng.integers(-1, 32))
    elif action == 1:
        model.opset_import.add(domain="com.bogus", version=1)
    else:
        del model.opset_import[:]


def _ir_version(model, rng) -> None:
    model.ir_version = int(rng.integers(-1, 16))


def _value_info(model, rng) -> None:
    value = _pick(rng, [*model.graph.input, *model.graph.output])
    tensor_type = value.type.tensor_type
    action = int(rng.integers(5))
    if action == 0:
        tensor_type.elem_type = int(_pick(rng, DATA_TYPES))
    elif action == 1 and tensor_type.shape.dim:
        dim = tensor_type.shape.dim[int(rng.integers(len(tensor_type.shape.dim)))]
        dim.dim_value = _pick(rng, ODD_INTEGERS)
    elif action == 2:
        tensor_type.shape.dim.add(dim_value=int(rng.integers(1, 4)))
    elif action == 3:
        value.name = _pick(rng, ODD_NAMES)
    else:
        model.graph.input.add().CopyFrom(value)


def _external_data(model, rng) -> None:
    tensor = _tensor(model, rng)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=_pick(rng, ODD_LOCATIONS))
    if rng.random() < 0.5:
        tensor.external_data.add(key=_pick(rng, ("offset", "length", "basepath")), value="64")


def _initializer_name(model, rng) -> None:
    tensor = _tensor(model, rng)
    if rng.random() < 0.5:
        tensor.name = _pick(rng, ODD_NAMES)
    else:
        model.graph.initializer.add().CopyFrom(tensor)


PROTO_MUTATIONS = {
    function.__name__.strip("_"): function
    for function in (
        _dims,
        _data_type,
        _raw_data,
        _attribute,
        _node_input,
        _node_output,
        _op_type,
        _drop_or_repeat_node,
        _opset,
        _ir_version,
        _value_info,
        _external_data,
        _initializer_name,
    )
}


# --- mutations of the bytes ------------------------------------------------------------


def _flip(data: bytes, rng) -> bytes:
    buffer = bytearray(data)
    for position in rng.integers(len(buffer), size=int(rng.integers(1, 17))):
        buffer[position] ^= int(rng.integers(1, 256))
    return bytes(buffer)


def _truncate(data: bytes, rng) -> bytes:
    return data[: int(rng.integers(len(data)))]


def _splice(data: bytes, rng) -> bytes:
    start = int(rng.integers(len(data)))
    chunk = rng.bytes(int(rng.integers(1, 64))) if rng.random() < 0.5 else data[start : start + 64]
    return data[:start] + chunk + data[start:]


BYTE_MUTATIONS = {"flip": _flip, "truncate": _truncate, "splice": _splice}


def mutated(original: bytes, rng: np.random.Generator) -> tuple[bytes, list[str]]:
    """The model's bytes after one to three mutations, and their names. Field edits need
    a model that still parses, with nodes, initializers and an opset to edit."""
    data, names = original, []
    for _ in range(int(rng.integers(1, 4))):
        model = _parsed_or_none(data)
        editable = model is not None and all(
            (model.graph.node, model.graph.initializer, model.opset_import)
        )
        if editable and rng.random() < PROTO_SHARE:
            name = _pick(rng, sorted(PROTO_MUTATIONS))
            PROTO_MUTATIONS[name](model, rng)
            data = model.SerializeToString()
        else:
            name = _pick(rng, sorted(BYTE_MUTATIONS))
            data = BYTE_MUTATIONS[name](data, rng) if data else data
        names.append(name)
    return data, names


def _parsed_or_none(data: bytes) -> onnx.ModelProto | None:
    try:
        return onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError):
        return None


# --- running the cases -----------------------------------------------------------------


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def run_onnx_forget(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m onnx_forget ARGS` in `cwd` as one case: one BLAS thread, memory capped,
    at most CASE_TIMEOUT_S."""
    return subprocess.run(
        [sys.executable, "-m", "onnx_forget", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT_S,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
        preexec_fn=_limit_memory,
        check=False,
    )


def run_case(case: int, data: bytes, mutations: list[str], samples: Path, work: Path) -> Outcome:
    """The CLI on one mutated model in a folder of its own, checked against the contract."""
    folder = work / f"case-{case:04d}"
    folder.mkdir()
    model = folder / "model.onnx"
    model.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    command = ["model.onnx", "--forget-class", "3", "--samples", str(samples)]
    command += ["--device", "cpu", "-o", "out.onnx", "-q"]
    command += ["--retain-per-class", str(SAMPLES_PER_CLASS)]
    command += ["--forget-samples", str(SAMPLES_PER_CLASS)]
    start = time.perf_counter()
    try:
        process = run_onnx_forget(command, folder)
        code, stderr = process.returncode, process.stderr
    except subprocess.TimeoutExpired as expired:
        code, stderr = None, (expired.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    contract = []
    if hashlib.sha256(model.read_bytes()).hexdigest() != digest:
        contract.append("input changed")
    found = {p.name for p in folder.iterdir()}
    if found != {"model.onnx", *(["out.onnx"] if code == 0 else [])}:
        contract.append("files left: " + ", ".join(sorted(found)))
    if code not in (0, None) and len(stderr.splitlines()) != 1:
        contract.append(f"{len(stderr.splitlines())} stderr lines")
    return Outcome(case, mutations, code, stderr, contract, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", type=Path, default=FIXTURES / "mnist_cnn.onnx")
    parser.add_argument("--keep", type=Path, help="Copy the models of failing cases here.")
    args = parser.parse_args()
    original = args.model.read_bytes()
    with tempfile.TemporaryDirectory(prefix="onnx-forget-fuzz-") as name:
        work = Path(name)
        samples = work / "samples.npz"
        with np.load(FIXTURES / "mnist_heldout.npz") as held_out:
            x, y = held_out["x"], held_out["y"]
            chosen = np.concatenate([np.flatnonzero(y == c)[:SAMPLES_PER_CLASS] for c in set(y)])
            np.savez(samples, x=x[chosen], y=y[chosen])
        cases = []
        for case in range(args.cases):
            data, mutations = mutated(original, np.random.default_rng([args.seed, case]))
            cases.append((case, data, mutations))
        start = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            outcomes = list(pool.map(lambda c: run_case(*c, samples, work), cases))
        elapsed = time.perf_counter() - start
        failures = [o for o in outcomes if o.crashed or o.code is None or o.contract]
        if args.keep and failures:
            args.keep.mkdir(parents=True, exist_ok=True)
            for outcome in failures:
                source = work / f"case-{outcome.case:04d}" / "model.onnx"
                shutil.copy(source, args.keep / f"case-{outcome.case:04d}.onnx")
    report(outcomes, failures, elapsed, args.jobs)
    sys.exit(1 if failures else 0)


def report(outcomes: list[Outcome], failures: list[Outcome], elapsed: float, jobs: int) -> None:
    codes = Counter(o.code for o in outcomes if o.code is not None)
    print(f"cases tried      {len(outcomes):6d}")
    print(
        f"crashes          {sum(o.crashed for o in outcomes):6d}   (exit outside 0/2/3/4, "
        "a traceback, or a signal)"
    )
    print(
        f"hangs            {sum(o.code is None for o in outcomes):6d}   (over {CASE_TIMEOUT_S} s)"
    )
    print(
        f"broken contract  {sum(bool(o.contract) for o in outcomes):6d}   "
        "(refusal not one line, input changed, file left)"
    )
    print("exit code   count")
    for code, count in sorted(codes.items()):
        print(f"{code:9d}   {count:5d}")
    print(f"{elapsed:.0f} s, {elapsed / max(len(outcomes), 1):.2f} s a case with {jobs} jobs")
    for outcome in failures:
        last = outcome.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        print(
            f"case {outcome.case} {'+'.join(outcome.mutations)}: exit {outcome.code} "
            f"{'; '.join(outcome.contract)} {last[0][:200]}"
        )


if __name__ == "__main__":
    main()
