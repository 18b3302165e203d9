"""Untrusted models and samples, and faults while running (issue 5), fed to the CLI.

Each refusal is checked from four sides: the documented exit code, one stderr line that
names the file at fault, every file of the run's folder (the input model included) with
its bytes unchanged, and nothing new left behind. Bad inputs test_cli.py already covers
(missing, random, empty or folder models, --forget-class 12, empty sample folders, ...)
are not repeated here.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import onnx_forget
from onnx_forget import runtime
from onnx_forget.errors import InputError, UnsupportedModelError
from onnx_forget.modelio import OutputFiles, load_model
from tests import models
from tests.conftest import CLI_TIMEOUT_S, MODEL, SAMPLES, listing, run_cli, sha256

PROGRAM = "onnx-forget"
EXIT_USAGE, EXIT_UNSUPPORTED, EXIT_INTERRUPTED = 2, 3, 130
# Runs that are refused or whose accuracy is not the point: as few samples as work.
FEW = ("--retain-per-class", "5", "--forget-samples", "5")
SECRET = b"outside the model's folder " * 64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Over twice Pillow's MAX_IMAGE_PIXELS (89,478,485): a decompression bomb by its size alone.
BOMB_SIDE = 20_000
POLL_S = 0.002


@pytest.fixture(autouse=True)
def _one_blas_thread(monkeypatch):
    """OpenBLAS threads spin against any other process on a small machine (30 s instead
    of 2 s for one decomposition); every CLI run here gets one thread."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def _snapshot(folder: Path) -> dict[str, str | None]:
    """Every path under `folder` with its file's SHA-256 (None for folders and links)."""
    return {
        name: sha256(folder / name)
        if (folder / name).is_file() and not (folder / name).is_symlink()
        else None
        for name in listing(folder)
    }


@dataclass
class _Refusal:
    """One bad input, run through the CLI in a folder of its own."""

    folder: Path
    args: list
    code: int
    mentions: tuple[str, ...]  # what the message must name: the file, the reason
    before: dict[str, str | None]
    process: subprocess.CompletedProcess | None = None

    def check(self) -> None:
        """The exit code, one stderr line naming the file and the reason, every file of
        the folder (the input model included) as it was, nothing new."""
        process = self.process
        assert process.returncode == self.code, process.stderr
        assert "Traceback" not in process.stderr
        lines = process.stderr.splitlines()
        assert len(lines) == 1, process.stderr
        assert lines[0].startswith(f"{PROGRAM}: error: "), process.stderr
        for text in self.mentions:
            assert text in lines[0], (text, lines[0])
        assert _snapshot(self.folder) == self.before


def _case(setup, folder: Path) -> tuple[list, int, tuple[str, ...]]:
    """A setup's CLI arguments, exit code and mentions; an external data setup only
    names its model, which `forget` must refuse for its references."""
    made = setup(folder)
    if isinstance(made, str):
        return _forget(made), EXIT_USAGE, (made, "external data")
    return made


@pytest.fixture(scope="module")
def refusals(request, tmp_path_factory) -> dict:
    """Every refusal case the session selected, run once each, as many at a time as there
    are cores: a refused run is mostly the CLI starting, and there are dozens of them."""
    wanted = {
        item.callspec.params["setup"]
        for item in request.session.items
        if "refusals" in item.fixturenames and hasattr(item, "callspec")
    }
    cases = {}
    for setup in wanted:
        folder = tmp_path_factory.mktemp(_ids(setup))
        shutil.copy(MODEL, folder / MODEL.name)
        cases[setup] = _Refusal(folder, *_case(setup, folder), before=_snapshot(folder))
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(os.cpu_count()) as pool:
        patch.setenv("OPENBLAS_NUM_THREADS", "1")
        runs = pool.map(lambda case: run_cli(*case.args, cwd=case.folder), cases.values())
        for case, process in zip(cases.values(), runs):
            case.process = process
    return cases


def _ids(setup) -> str:
    return setup.__name__.strip("_")


def _forget(model, samples=SAMPLES, *extra) -> list:
    return [model, "--forget-class", "3", "--samples", samples, *FEW, *extra]


def _save(proto: onnx.ModelProto, tmp: Path, name: str) -> str:
    """Write the proto's bytes as they are (no checker, no external data handling)."""
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return name


def _fixture() -> onnx.ModelProto:
    return onnx.load(MODEL)


# --- untrusted models ------------------------------------------------------------------


def _truncated(tmp):
    (tmp / "cut.onnx").write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    return _forget("cut.onnx"), EXIT_USAGE, ("cut.onnx", "truncated")


def _fails_the_checker(tmp):
    proto = _fixture()
    proto.graph.node[2].input[0] = "nowhere"
    _save(proto, tmp, "bad.onnx")
    return _forget("bad.onnx"), EXIT_UNSUPPORTED, ("bad.onnx", "ONNX checker")


def _no_projectable_layer(tmp):
    softmax = models.make_model(
        [helper.make_node("Softmax", ["x"], ["y"], axis=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [],
    )
    _save(softmax, tmp, "soft.onnx")
    return _forget("soft.onnx"), EXIT_UNSUPPORTED, ("soft.onnx", "no projectable")


def _two_data_inputs(tmp):
    proto = _fixture()
    proto.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 3]))
    _save(proto, tmp, "two.onnx")
    return _forget("two.onnx"), EXIT_UNSUPPORTED, ("two.onnx", "exactly one data input")


def _no_scores_output(tmp):
    proto = _fixture()
    proto.graph.node.append(helper.make_node("ArgMax", ["logits"], ["label"], axis=1))
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N", 1]))
    _save(proto, tmp, "argmax.onnx")
    return _forget("argmax.onnx"), EXIT_UNSUPPORTED, ("argmax.onnx", "--output NAME")


def _output_name_of_a_feature_map(tmp):
    proto = _fixture()
    feature_map = helper.make_tensor_value_info(
        "/2/Relu_output_0", TensorProto.FLOAT, ["N", 16, 28, 28]
    )
    proto.graph.output.append(feature_map)
    _save(proto, tmp, "maps.onnx")
    args = _forget("maps.onnx", SAMPLES, "--output", "/2/Relu_output_0")
    return args, EXIT_UNSUPPORTED, ("maps.onnx", "not float [N, classes] scores")


def _opset_onnxruntime_cannot_run(tmp):
    proto = _fixture()
    proto.opset_import[0].version = onnx.defs.onnx_opset_version()  # past onnxruntime's
    _save(proto, tmp, "future.onnx")
    return (
        _forget("future.onnx"),
        EXIT_UNSUPPORTED,
        ("future.onnx", "CPUExecutionProvider", "cannot load"),
    )


def _op_onnxruntime_lacks(tmp):
    proto = _fixture()
    proto.graph.node[1].op_type, proto.graph.node[1].domain = "Swish", "com.example"
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    _save(proto, tmp, "custom.onnx")
    return (
        _forget("custom.onnx"),
        EXIT_UNSUPPORTED,
        ("custom.onnx", "CPUExecutionProvider", "Swish"),
    )


def _fuzz_undefined_data_type(tmp):
    """benchmarks/fuzz_models.py seed 1 case 87: a data type the checker lets through."""
    proto = _fixture()
    proto.graph.initializer[2].data_type = 99
    _save(proto, tmp, "type99.onnx")
    return _forget("type99.onnx"), EXIT_UNSUPPORTED, ("type99.onnx", "data type 99")


def _fuzz_more_data_than_shape(tmp):
    """Fuzz seed 1 case 155: onnxruntime refuses what the checker passes, and its own log
    line must not reach stderr."""
    proto = _fixture()
    bias = next(t for t in proto.graph.initializer if t.name == "onnx::Conv_46")
    del bias.dims[:]
    _save(proto, tmp, "scalar.onnx")
    return _forget("scalar.onnx"), EXIT_UNSUPPORTED, ("scalar.onnx", "CPUExecutionProvider")


def _fuzz_nan_weights(tmp):
    """Fuzz seed 1 case 285: random weight bits, NaN activations, no decomposition."""
    proto = _fixture()
    weight = proto.graph.initializer[4]  # the first conv's
    weight.raw_data = np.full(tuple(weight.dims), np.nan, np.float32).tobytes()
    _save(proto, tmp, "nan.onnx")
    return _forget("nan.onnx"), EXIT_UNSUPPORTED, ("NaN or Inf",)


def _fuzz_overflowing_head(tmp):
    """Fuzz seed 2 case 84: weights so large the head's logits overflow; the refit of the
    head must refuse them, and numpy's warnings must not reach stderr."""
    proto = _fixture()
    head = next(t for t in proto.graph.initializer if t.name == "14.weight")
    weight = numpy_helper.to_array(head).copy()
    weight[0, 0] = np.finfo(np.float32).max
    head.CopyFrom(numpy_helper.from_array(weight, head.name))
    _save(proto, tmp, "huge.onnx")
    return _forget("huge.onnx"), EXIT_UNSUPPORTED, ("NaN or Inf",)


def _over_the_model_limit(tmp):
    args = _forget(MODEL.name, SAMPLES, "--max-model-bytes", "100000")
    return args, EXIT_USAGE, (MODEL.name, "--max-model-bytes")


def _external_data_over_the_model_limit(tmp):
    path, _ = _external_model(tmp / "models")
    limit = str(path.stat().st_size + 1000)  # the .onnx alone fits, its weights do not
    args = _forget("models/model.onnx", SAMPLES, "--max-model-bytes", limit)
    return args, EXIT_USAGE, ("models/model.onnx", "external data", "--max-model-bytes")


def _layers_over_the_model_limit(tmp):
    args = ["layers", MODEL.name, "--max-model-bytes", "1000"]
    return args, EXIT_USAGE, (MODEL.name, "--max-model-bytes")


@pytest.mark.parametrize(
    "setup",
    [
        _truncated,
        _fails_the_checker,
        _no_projectable_layer,
        _two_data_inputs,
        _no_scores_output,
        _output_name_of_a_feature_map,
        _opset_onnxruntime_cannot_run,
        _op_onnxruntime_lacks,
        _over_the_model_limit,
        _external_data_over_the_model_limit,
        _layers_over_the_model_limit,
        _fuzz_undefined_data_type,
        _fuzz_more_data_than_shape,
        _fuzz_nan_weights,
        _fuzz_overflowing_head,
    ],
    ids=_ids,
)
def test_untrusted_model_is_refused(refusals, setup):
    """Corrupt, unsupported or oversized models: exit 2 or 3 with the reason."""
    refusals[setup].check()


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    """With --debug the traceback comes first, then the same line and exit code."""
    args, code, _ = _truncated(tmp_path)
    process = run_cli(*args, "--debug", cwd=tmp_path)
    assert process.returncode == code
    assert "Traceback" in process.stderr
    assert process.stderr.splitlines()[-1].startswith(f"{PROGRAM}: error: cut.onnx")


# --- weights of other float types ------------------------------------------------------


def _cast_model(dtype) -> onnx.ModelProto:
    """The mixed test model with every weight stored as `dtype` behind a Cast to float."""
    weights = models.mixed_weights()
    nodes = models.mixed_model(weights).graph.node
    casts, initializers = [], []
    for name, value in weights.items():
        initializers.append(numpy_helper.from_array(value.astype(dtype), name + ".stored"))
        casts.append(
            helper.make_node("Cast", [name + ".stored"], [name], name="cast_" + name, to=1)
        )
    initializers.append(numpy_helper.from_array(np.array([0, 6, 20], np.int64), "shape"))
    return models.make_model(
        casts + list(nodes),
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *models.MIXED_INPUT])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", models.MIXED_CLASSES])],
        initializers,
    )


def _mixed_samples(path: Path, count: int = 24) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, *models.MIXED_INPUT)).astype(np.float32)
    np.savez(path, x=x, y=np.arange(count) % models.MIXED_CLASSES)
    return path


@pytest.mark.parametrize(
    "dtype", [np.float16, ml_dtypes.bfloat16, np.float64], ids=["float16", "bfloat16", "float64"]
)
def test_weights_behind_casts_keep_their_stored_type(tmp_path, dtype):
    """float16 / bfloat16 / float64 weights Cast to float: projected, stored back as they
    were, and the projection moved them."""
    original = _cast_model(dtype)
    _save(original, tmp_path, "cast.onnx")
    _mixed_samples(tmp_path / "samples.npz")
    process = run_cli(
        "cast.onnx", "--forget-class", "1", "--samples", "samples.npz", "-o", "out.onnx", "-q",
        cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    before = _initializers(original)
    after = _initializers(onnx.load(tmp_path / "out.onnx"))
    for name in models.mixed_weights():
        stored = name + ".stored"
        assert after[stored].dtype == np.dtype(dtype), name
        moved = not np.array_equal(after[stored], before[stored])
        assert moved == name.endswith("_w"), name  # weights projected, biases as they were


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# --- external data ---------------------------------------------------------------------


def _external_model(folder: Path) -> tuple[Path, onnx.ModelProto]:
    """The fixture CNN in `folder`, every weight in `model.onnx.data`; the stored proto."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        _fixture(), path, save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    return path, onnx.load(path, load_external_data=False)


def _secret(tmp: Path) -> Path:
    """A file outside the model's folder that no external reference may reach."""
    path = tmp / "secret.bin"
    path.write_bytes(SECRET)
    return path


def _repoint(tmp: Path, *entries: tuple[str, str]) -> str:
    """The external model with its first weight's entries replaced by `entries`."""
    _, proto = _external_model(tmp / "models")
    tensor = proto.graph.initializer[0]
    del tensor.external_data[:]
    for key, value in entries:
        tensor.external_data.add(key=key, value=value)
    return _save(proto, tmp, "models/model.onnx")


def _parent_location(tmp):
    _secret(tmp)
    return _repoint(tmp, ("location", "../secret.bin"))


def _location_through_a_subfolder(tmp):
    _secret(tmp)
    (tmp / "models" / "sub").mkdir(parents=True)
    return _repoint(tmp, ("location", "sub/../../secret.bin"))


def _absolute_location(tmp):
    return _repoint(tmp, ("location", str(_secret(tmp))))


def _symlink_to_outside(tmp):
    secret = _secret(tmp)
    model = _repoint(tmp, ("location", "link.bin"))
    (tmp / "models" / "link.bin").symlink_to(secret)
    return model


def _symlinked_folder_to_outside(tmp):
    _secret(tmp)
    model = _repoint(tmp, ("location", "data/secret.bin"))
    (tmp / "models" / "data").symlink_to(tmp)
    return model


def _hard_link_to_outside(tmp):
    secret = _secret(tmp)
    model = _repoint(tmp, ("location", "copy.bin"))
    os.link(secret, tmp / "models" / "copy.bin")
    return model


def _offset_beyond_the_file(tmp):
    return _repoint(tmp, ("location", "model.onnx.data"), ("offset", str(10**9)))


def _length_beyond_the_file(tmp):
    return _repoint(tmp, ("location", "model.onnx.data"), ("offset", "0"), ("length", str(10**9)))


def _unknown_key(tmp):
    return _repoint(tmp, ("location", "model.onnx.data"), ("basepath", str(tmp)))


def _location_given_twice(tmp):
    _secret(tmp)
    return _repoint(tmp, ("location", "model.onnx.data"), ("location", "../secret.bin"))


def _offset_not_a_number(tmp):
    return _repoint(tmp, ("location", "model.onnx.data"), ("offset", "-4"))


def _windows_parent_location(tmp):
    return _repoint(tmp, ("location", "..\\secret.bin"))


def _missing_data_file(tmp):
    return _repoint(tmp, ("location", "gone.bin"))


def _external(name: str, location: str = "../secret.bin") -> onnx.TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def _tiny_model(node: onnx.NodeProto, **fields) -> onnx.ModelProto:
    """One node reading x and writing y: enough to parse, not meant to pass the checker."""
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    for name, value in fields.items():
        getattr(model, name).extend(value)
    return model


def _in_a_subgraph(tmp):
    _secret(tmp)
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=_external("hidden"))],
        "branch",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])],
    )
    node = helper.make_node("If", ["x"], ["y"], then_branch=branch, else_branch=branch)
    return _save(_tiny_model(node), tmp, "models/model.onnx")


def _in_a_constant_node(tmp):
    _secret(tmp)
    node = helper.make_node("Constant", [], ["y"], value=_external("constant"))
    return _save(_tiny_model(node), tmp, "models/model.onnx")


def _in_a_sparse_initializer(tmp):
    _secret(tmp)
    model = _tiny_model(helper.make_node("Identity", ["x"], ["y"]))
    sparse = model.graph.sparse_initializer.add()
    sparse.values.CopyFrom(_external("sparse"))
    sparse.indices.CopyFrom(numpy_helper.from_array(np.arange(4, dtype=np.int64), "idx"))
    sparse.dims.extend([8])
    return _save(model, tmp, "models/model.onnx")


def _in_a_function_body(tmp):
    _secret(tmp)
    function = helper.make_function(
        "local",
        "Secretly",
        ["a"],
        ["b"],
        [helper.make_node("Constant", [], ["b"], value=_external("in_function"))],
        [helper.make_opsetid("", models.OPSET)],
    )
    node = helper.make_node("Secretly", ["x"], ["y"], domain="local")
    model = _tiny_model(node, functions=[function])
    model.opset_import.append(helper.make_opsetid("local", 1))
    return _save(model, tmp, "models/model.onnx")


ESCAPES = [
    _parent_location,
    _location_through_a_subfolder,
    _absolute_location,
    _symlink_to_outside,
    _symlinked_folder_to_outside,
    _hard_link_to_outside,
    _offset_beyond_the_file,
    _length_beyond_the_file,
    _unknown_key,
    _location_given_twice,
    _offset_not_a_number,
    _windows_parent_location,
    _missing_data_file,
    _in_a_subgraph,
    _in_a_constant_node,
    _in_a_sparse_initializer,
    _in_a_function_body,
]
# The classes of the onnx advisories (CVE-2022-25882, CVE-2024-27318, CVE-2025-51480,
# CVE-2026-27489, CVE-2026-34445/34446/34447), each run through the CLI.
ADVISORY_CLASSES = [
    _parent_location,
    _location_through_a_subfolder,
    _absolute_location,
    _symlink_to_outside,
    _hard_link_to_outside,
    _offset_beyond_the_file,
    _length_beyond_the_file,
    _unknown_key,
    _in_a_subgraph,
]


@pytest.mark.parametrize("setup", ADVISORY_CLASSES, ids=_ids)
def test_external_data_outside_the_folder_or_file_is_refused(refusals, setup):
    """Every class of the advisories: exit 2, the model named, nothing read or written."""
    refusals[setup].check()


class _OpenedFiles:
    """Every path Python opens while recording (audit hooks stay for the process, so one
    hook is added once and records only inside `with`)."""

    paths: list[str] | None = None
    installed = False

    def __enter__(self) -> list[str]:
        if not _OpenedFiles.installed:
            sys.addaudithook(_OpenedFiles._hook)
            _OpenedFiles.installed = True
        _OpenedFiles.paths = []
        return _OpenedFiles.paths

    def __exit__(self, *exc_info):
        _OpenedFiles.paths = None

    @staticmethod
    def _hook(event: str, args) -> None:
        if event == "open" and _OpenedFiles.paths is not None and not isinstance(args[0], int):
            _OpenedFiles.paths.append(os.fspath(args[0]))


@pytest.mark.parametrize("setup", ESCAPES, ids=_ids)
def test_external_data_is_refused_before_a_byte_outside_is_opened(tmp_path, setup):
    """No file outside the model's folder is even opened before the refusal, whatever
    holds the tensor (initializer, subgraph, Constant, sparse tensor, function body)."""
    model = tmp_path / setup(tmp_path)
    folder = model.parent.resolve()
    with _OpenedFiles() as opened, pytest.raises(InputError, match="external data"):
        load_model(model)
    assert opened, "the model file itself is opened"
    assert all(Path(path).resolve().is_relative_to(folder) for path in opened), opened


def test_in_memory_model_with_external_references_is_refused():
    """A ModelProto has no folder to check references against: refused, nothing opened."""
    model = _tiny_model(helper.make_node("Identity", ["x"], ["y"]))
    model.graph.initializer.append(_external("w", "/etc/passwd"))
    with _OpenedFiles() as opened, pytest.raises(InputError, match="external"):
        load_model(model)
    assert opened == []


def test_external_data_is_written_inside_the_output_folder_only(tmp_path):
    """A link planted where the output's `.data` goes is replaced, not written through."""
    _external_model(tmp_path / "models")
    victim = _secret(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "new.onnx.data").symlink_to(victim)
    process = run_cli(*_forget("models/model.onnx"), "-o", "out/new.onnx", "-q", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert victim.read_bytes() == SECRET
    assert not (tmp_path / "out" / "new.onnx.data").is_symlink()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.onnx", "new.onnx.data"]
    assert len(load_model(tmp_path / "out" / "new.onnx").proto.graph.initializer) == 10


# --- bad samples -----------------------------------------------------------------------


def _class_folders(tmp: Path, classes=(3, 4), per_class: int = 5) -> Path:
    """`tmp/samples` with the first `per_class` fixture digits of each class."""
    root = tmp / "samples"
    for label in classes:
        (root / str(label)).mkdir(parents=True)
        for source in sorted((SAMPLES / str(label)).iterdir())[:per_class]:
            shutil.copy(source, root / str(label) / source.name)
    return root


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _only_non_sample_files(tmp):
    root = _class_folders(tmp, classes=(3,))
    (root / "4").mkdir()
    (root / "4" / "README").write_text("nothing here\n")
    (root / "4" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return _forget(MODEL.name, "samples"), EXIT_USAGE, ("samples/4", "no sample files")


def _class_folder_beyond_the_model(tmp):
    root = _class_folders(tmp, classes=(3, 4))
    shutil.copytree(root / "4", root / "12")
    return _forget(MODEL.name, "samples"), EXIT_USAGE, ("class 12", "10 classes")


def _forget_every_class(tmp):
    every = ",".join(map(str, range(10)))
    return [MODEL.name, "--forget-class", every, "--samples", SAMPLES], EXIT_USAGE, ("every class",)


def _forget_class_without_samples(tmp):
    _class_folders(tmp, classes=(4, 5))
    return _forget(MODEL.name, "samples"), EXIT_USAGE, ("samples", "no samples of class 3")


def _truncated_png(tmp):
    root = _class_folders(tmp)
    data = (SAMPLES / "3" / "0000.png").read_bytes()
    (root / "3" / "cut.png").write_bytes(data[: len(data) // 2])
    return _forget(MODEL.name, "samples"), EXIT_USAGE, ("cut.png", "not a readable")


def _decompression_bomb(tmp):
    root = _class_folders(tmp)
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 0, 0, 0, 0)
    bomb = PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")
    (root / "3" / "bomb.png").write_bytes(bomb)
    return _forget(MODEL.name, "samples"), EXIT_USAGE, ("bomb.png", "decompression bomb")


def _other_format_named_png(tmp):
    root = _class_folders(tmp)
    Image.new("L", (28, 28)).save(root / "3" / "really.png", format="GIF")
    return _forget(MODEL.name, "samples"), EXIT_USAGE, ("really.png", "PNG, JPEG, BMP, WEBP")


def _npy_that_needs_pickle(tmp):
    root = _class_folders(tmp)
    np.save(root / "3" / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return _forget(MODEL.name, "samples"), EXIT_USAGE, ("objects.npy", "pickle")


def _npy_of_complex_numbers(tmp):
    root = _class_folders(tmp)
    np.save(root / "3" / "complex.npy", np.zeros((1, 28, 28), np.complex64))
    return _forget(MODEL.name, "samples"), EXIT_USAGE, ("complex.npy", "dtype complex64")


def _npy_with_nan(tmp):
    root = _class_folders(tmp)
    array = np.zeros((1, 28, 28), np.float32)
    array[0, 3, 4] = np.nan
    np.save(root / "3" / "nan.npy", array)
    return _forget(MODEL.name, "samples"), EXIT_USAGE, ("nan.npy", "NaN or Inf")


def _npz_with_inf(tmp):
    x = np.zeros((4, 1, 28, 28), np.float32)
    x[2, 0, 0, 0] = np.inf
    np.savez(tmp / "inf.npz", x=x, y=np.array([3, 3, 4, 4]))
    return _forget(MODEL.name, "inf.npz"), EXIT_USAGE, ("inf.npz", "NaN or Inf")


def _npz_without_x(tmp):
    np.savez(tmp / "y_only.npz", y=np.array([3, 4]))
    return _forget(MODEL.name, "y_only.npz"), EXIT_USAGE, ("y_only.npz", "lacks array(s) x")


def _npy_named_npz(tmp):
    np.save(tmp / "plain.npy", np.zeros((4, 1, 28, 28), np.float32))
    (tmp / "plain.npy").rename(tmp / "plain.npz")
    return _forget(MODEL.name, "plain.npz"), EXIT_USAGE, ("plain.npz", "not a readable .npz")


def _npz_bomb(tmp):
    x = np.zeros((3000, 1, 28, 28), np.float32)  # 9.4 MB that compress to some 10 kB
    np.savez_compressed(tmp / "bomb.npz", x=x, y=np.zeros(3000, np.int64))
    args = _forget(MODEL.name, "bomb.npz", "--max-sample-bytes", "1000000")
    return args, EXIT_USAGE, ("bomb.npz", "--max-sample-bytes")


def _eval_samples_with_a_corrupt_image(tmp):
    """Held-out samples are read before the output is written, so nothing is left."""
    root = _class_folders(tmp)
    (root / "4" / "corrupt.png").write_bytes(PNG_SIGNATURE + b"\0" * 64)
    args = _forget(MODEL.name, SAMPLES, "--eval-samples", "samples", "-o", "out.onnx")
    return args, EXIT_USAGE, ("corrupt.png", "not a readable")


def _sample_file_over_the_limit(tmp):
    _class_folders(tmp)
    args = _forget(MODEL.name, "samples", "--max-sample-bytes", "200")
    return args, EXIT_USAGE, ("samples/3/0000.png", "--max-sample-bytes")


@pytest.mark.parametrize(
    "setup",
    [
        _only_non_sample_files,
        _class_folder_beyond_the_model,
        _forget_every_class,
        _forget_class_without_samples,
        _truncated_png,
        _decompression_bomb,
        _other_format_named_png,
        _npy_that_needs_pickle,
        _npy_of_complex_numbers,
        _npy_with_nan,
        _npz_with_inf,
        _npz_without_x,
        _npy_named_npz,
        _npz_bomb,
        _sample_file_over_the_limit,
        _eval_samples_with_a_corrupt_image,
    ],
    ids=_ids,
)
def test_bad_samples_are_refused(refusals, setup):
    """Bad sample folders and files: exit 2, the file or folder named, nothing written."""
    refusals[setup].check()


def test_mixed_folders_and_non_sample_files_are_skipped_and_counted(tmp_path, model):
    """Images and `.npy` arrays mix freely; README and .DS_Store, in class folders or at the
    top, are skipped and counted in the report."""
    root = _class_folders(tmp_path, classes=range(10), per_class=3)
    rng = np.random.default_rng(0)
    for label in (3, 7):
        np.save(root / str(label) / "extra.npy", rng.random((1, 28, 28), np.float32))
    (root / "README").write_text("digits\n")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "3" / "notes.txt").write_text("hand-picked\n")
    process = run_cli(*_forget(MODEL.name, "samples"), "--report", "r.json", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    samples = json.loads((tmp_path / "r.json").read_text())["samples"]
    assert samples["skipped_files"] == 3
    assert (samples["retain"], samples["forget"]) == (9 * 3 + 1, 4)


# --- faults while running --------------------------------------------------------------


def _unwritable_output_folder(tmp):
    """sysfs takes no new file, even from root (for whom permissions are no test)."""
    return _forget(MODEL.name, SAMPLES, "-o", "/sys/out.onnx"), EXIT_USAGE, ("/sys",)


@pytest.mark.parametrize("setup", [_unwritable_output_folder], ids=_ids)
def test_unwritable_output_folder_is_refused(refusals, setup):
    """Nowhere to write the output: exit 2 naming the folder, after the whole run."""
    refusals[setup].check()


def test_writes_that_fail_like_a_full_disk_leave_nothing(tmp_path, model):
    """The file size limit makes the output's write fail midway (EFBIG, as ENOSPC would):
    exit 2 naming the output, and no partial file."""
    limit = model.stat().st_size // 4

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = _snapshot(tmp_path)
    process = subprocess.run(
        [sys.executable, "-m", "onnx_forget", *map(str, _forget(model.name)), "-o", "out.onnx"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        preexec_fn=small_files,
        check=False,
    )
    assert process.returncode == EXIT_USAGE, process.stderr
    (line,) = process.stderr.splitlines()
    assert line.startswith(f"{PROGRAM}: error: out.onnx: cannot write the output"), line
    assert _snapshot(tmp_path) == before


def _fake_full_disk(model, path, *args, **kwargs):
    Path(path).write_bytes(b"half a model")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fake_ctrl_c(model, path, *args, **kwargs):
    Path(path).write_bytes(b"half a model")
    raise KeyboardInterrupt


@pytest.mark.parametrize("external_data", [False, True], ids=["inline", "external-data"])
@pytest.mark.parametrize(
    ("writer", "error"),
    [(_fake_full_disk, InputError), (_fake_ctrl_c, KeyboardInterrupt)],
    ids=["disk-full", "ctrl-c"],
)
def test_failure_inside_the_writer_leaves_no_file(
    tmp_path, monkeypatch, writer, error, external_data
):
    """Disk full or Ctrl-C while the model is being written: no partial file remains."""
    monkeypatch.setattr(onnx, "save_model", writer)
    with pytest.raises(error):
        _save_model(_fixture(), tmp_path / "out.onnx", external_data, lambda p: None)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_checking_the_written_file_leaves_no_file(tmp_path):
    """Ctrl-C after the bytes are written but before the rename: nothing remains."""

    def interrupted(staged: Path):
        assert staged.is_file()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _save_model(_fixture(), tmp_path / "out.onnx", True, interrupted)
    assert list(tmp_path.iterdir()) == []


def _wait_until_reading(process: subprocess.Popen, folder: Path) -> None:
    """Return once the process has a file of `folder` open: it is collecting."""
    fds, prefix = Path(f"/proc/{process.pid}/fd"), str(folder.resolve())
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        for fd in fds.iterdir():
            try:
                if os.readlink(fd).startswith(prefix):
                    return
            except OSError:  # closed meanwhile
                continue
        time.sleep(POLL_S)
    pytest.fail(f"the CLI never opened a sample (exit {process.poll()})")


def test_ctrl_c_during_collection_exits_130_and_writes_nothing(tmp_path, model):
    """SIGINT while samples are being run: exit 130, one line, nothing written."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("watches /proc/PID/fd to know when collection started")
    before = _snapshot(tmp_path)
    command = [sys.executable, "-m", "onnx_forget", model.name, "--forget-class", "3"]
    process = subprocess.Popen(
        [*command, "--samples", str(SAMPLES), "-q"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A test run started in the background of a shell ignores SIGINT, and so would
        # the CLI it starts: give it the default a user's terminal gives.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_until_reading(process, SAMPLES)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    # click moves the line past a terminal's "^C" with an empty line of its own
    assert [line for line in stderr.splitlines() if line] == [
        f"{PROGRAM}: interrupted; nothing was written"
    ]
    assert _snapshot(tmp_path) == before


REAL_SESSION = runtime.ort.InferenceSession


class _FailingOnCuda:
    """An onnxruntime session that claims CUDA and fails as an unsupported op would: when
    the session starts (`fail_at = "load"`), when it runs (`"run"`), or only when the
    Gram products run (`"gram"`). It really runs on the CPU."""

    fail_at = "load"

    def __init__(self, payload, options=None, providers=(), provider_options=None):
        if providers[0] == runtime.CUDA and self.fail_at == "load":
            raise runtime.ort_state.Fail("CUDA cannot run node swish (op Swish)")
        self.real = REAL_SESSION(payload, options, providers=[runtime.CPU])
        self.providers = list(providers)
        self.computes_gram = [output.name for output in self.get_outputs()] == ["gram"]

    def get_providers(self):
        return self.providers

    def get_outputs(self):
        return self.real.get_outputs()

    def run(self, names, feed):
        failing = self.fail_at == "run" or (self.fail_at == "gram" and self.computes_gram)
        if self.providers[0] == runtime.CUDA and failing:
            raise runtime.ort_state.Fail("CUDA kernel for Swish failed")
        return self.real.run(names, feed)

    def io_binding(self):  # how a CUDA session is run
        return _Binding()

    def run_with_iobinding(self, binding):
        binding.outputs = self.run(binding.names, binding.feed)


class _Binding:
    """The IO binding calls a run on CUDA makes, kept as names and host arrays."""

    def __init__(self):
        self.feed, self.names, self.outputs = {}, [], []

    def bind_cpu_input(self, name, value):
        self.feed[name] = value

    def bind_output(self, name, device):
        self.names.append(name)

    def copy_outputs_to_cpu(self):
        return self.outputs


@pytest.mark.parametrize(
    ("fail_at", "reason"),
    [
        ("load", "cannot load the model"),
        ("run", "failed to run the model"),
        ("gram", "failed on a Gram matrix"),
    ],
)
def test_cuda_failure_names_the_provider_and_auto_falls_back_to_the_cpu(
    monkeypatch, fail_at, reason
):
    """CUDA failing on the model or on its Gram products: `--device cuda` is refused
    naming the provider; `auto` says why and gives the CPU run's weights."""
    options = {"retain_per_class": 5, "forget_samples": 5, "method": "paper"}
    model = onnx.load(MODEL)
    on_cpu = onnx_forget.forget(model, 3, SAMPLES, device="cpu", **options)
    monkeypatch.setattr(runtime, "cuda_starts", lambda: True)
    monkeypatch.setattr(_FailingOnCuda, "fail_at", fail_at)
    monkeypatch.setattr(runtime.ort, "InferenceSession", _FailingOnCuda)
    auto = onnx_forget.forget(model, 3, SAMPLES, device="auto", **options)
    assert auto.report.provider == runtime.CPU
    assert f"onnxruntime (CUDAExecutionProvider) {reason}" in auto.report.provider_note
    assert "ran on the CPU" in auto.report.provider_note
    assert auto.model.SerializeToString() == on_cpu.model.SerializeToString()
    with pytest.raises(UnsupportedModelError, match="CUDAExecutionProvider"):
        onnx_forget.forget(model, 3, SAMPLES, device="cuda", **options)


def test_same_inputs_and_seed_give_a_byte_identical_model(tmp_path, model):
    """Two runs with the same inputs and --seed write the same bytes."""
    for name in ("a.onnx", "b.onnx"):
        process = run_cli(*_forget(model.name), "--seed", "7", "-o", name, "-q", cwd=tmp_path)
        assert process.returncode == 0, process.stderr
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def _save_model(model, path, external_data, check) -> None:
    """Stage, check and commit one model, as a forget run writes its output."""
    with OutputFiles() as files:
        files.add_model(model, path, external_data, check)
        files.commit()
