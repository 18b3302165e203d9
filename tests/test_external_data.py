"""External-data references that reach outside the model's file or folder.

Locations through `..`, absolute paths, symbolic and hard links, linked folders,
Windows separators, offsets and lengths past the data file, unknown or repeated keys,
and references hidden in a subgraph, a Constant node, a sparse initializer or a function
body: the classes of the onnx advisories, each run through the CLI and refused with exit
2 naming the model, nothing read and nothing written. Loading such a model opens no file
outside its folder before refusing it, and an in-memory model with external references,
which has no folder to check them against, is refused without opening anything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_forget.errors import InputError
from onnx_forget.modelio import load_model
from tests import models
from tests.helpers import external_model, save_proto, secret_file, setup_id

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _repoint(tmp: Path, *entries: tuple[str, str]) -> str:
    """The external model with its first weight's entries replaced by `entries`."""
    _, proto = external_model(tmp / "models")
    tensor = proto.graph.initializer[0]
    del tensor.external_data[:]
    for key, value in entries:
        tensor.external_data.add(key=key, value=value)
    return save_proto(proto, tmp, "models/model.onnx")


def _parent_location(tmp):
    secret_file(tmp)
    return _repoint(tmp, ("location", "../secret.bin"))


def _location_through_a_subfolder(tmp):
    secret_file(tmp)
    (tmp / "models" / "sub").mkdir(parents=True)
    return _repoint(tmp, ("location", "sub/../../secret.bin"))


def _absolute_location(tmp):
    return _repoint(tmp, ("location", str(secret_file(tmp))))


def _symlink_to_outside(tmp):
    secret = secret_file(tmp)
    model = _repoint(tmp, ("location", "link.bin"))
    (tmp / "models" / "link.bin").symlink_to(secret)
    return model


def _symlinked_folder_to_outside(tmp):
    secret_file(tmp)
    model = _repoint(tmp, ("location", "data/secret.bin"))
    (tmp / "models" / "data").symlink_to(tmp)
    return model


def _hard_link_to_outside(tmp):
    secret = secret_file(tmp)
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
    secret_file(tmp)
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
    secret_file(tmp)
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=_external("hidden"))],
        "branch",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])],
    )
    node = helper.make_node("If", ["x"], ["y"], then_branch=branch, else_branch=branch)
    return save_proto(_tiny_model(node), tmp, "models/model.onnx")


def _in_a_constant_node(tmp):
    secret_file(tmp)
    node = helper.make_node("Constant", [], ["y"], value=_external("constant"))
    return save_proto(_tiny_model(node), tmp, "models/model.onnx")


def _in_a_sparse_initializer(tmp):
    secret_file(tmp)
    model = _tiny_model(helper.make_node("Identity", ["x"], ["y"]))
    sparse = model.graph.sparse_initializer.add()
    sparse.values.CopyFrom(_external("sparse"))
    sparse.indices.CopyFrom(numpy_helper.from_array(np.arange(4, dtype=np.int64), "idx"))
    sparse.dims.extend([8])
    return save_proto(model, tmp, "models/model.onnx")


def _in_a_function_body(tmp):
    secret_file(tmp)
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
    return save_proto(model, tmp, "models/model.onnx")


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


@pytest.mark.parametrize("setup", ADVISORY_CLASSES, ids=setup_id)
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


@pytest.mark.parametrize("setup", ESCAPES, ids=setup_id)
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
