"""Safe loading and atomic saving of ONNX models, external weight files included."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import InputError, UnsupportedModelError

# Protobuf cannot serialise a message over 2 GiB; such models keep weights beside them.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_KEYS = {"location", "offset", "length", "checksum"}


@dataclass
class LoadedModel:
    """A model in memory, with where it came from."""

    proto: onnx.ModelProto
    path: Path | None
    sha256: str
    has_external_data: bool


def load_model(source: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """Load a model from a path or take a ModelProto, refusing unsafe external data."""
    if isinstance(source, onnx.ModelProto):
        data = source.SerializeToString()
        return LoadedModel(source, None, hashlib.sha256(data).hexdigest(), False)
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    data = path.read_bytes()
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise InputError(f"{path}: not an ONNX model ({error})") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes)")
    external = [t for t in _all_tensors(proto.graph) if _is_external(t)]
    for tensor in external:
        _check_external_data(tensor, path.parent)
    if external:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    return LoadedModel(proto, path, hashlib.sha256(data).hexdigest(), bool(external))


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph: initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def _check_external_data(tensor: onnx.TensorProto, folder: Path) -> None:
    """Refuse external data that points outside the model's folder or beyond its file."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    unknown = set(entries) - EXTERNAL_DATA_KEYS
    if unknown:
        raise InputError(
            f"tensor {tensor.name!r}: unknown external data key(s) {sorted(unknown)}; "
            "refusing the model"
        )
    location = entries.get("location", "")
    candidate = folder / location
    inside = Path(os.path.normpath(location))
    if (
        not location
        or inside.is_absolute()
        or inside.parts[:1] == ("..",)
        or candidate.is_symlink()
        or not candidate.resolve().is_relative_to(folder.resolve())
    ):
        raise InputError(
            f"tensor {tensor.name!r}: external data location {location!r} is outside the "
            f"model's folder {folder}; refusing the model"
        )
    if not candidate.is_file():
        raise InputError(f"tensor {tensor.name!r}: external data file {candidate} is missing")
    status = candidate.stat()
    if status.st_nlink > 1:
        raise InputError(
            f"tensor {tensor.name!r}: external data file {candidate} is a hard link; "
            "copy it to a plain file"
        )
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries.get("length", status.st_size - offset))
    except ValueError:
        raise InputError(
            f"tensor {tensor.name!r}: external data offset/length not integers"
        ) from None
    if offset < 0 or length < 0 or offset + length > status.st_size:
        raise InputError(
            f"tensor {tensor.name!r}: external data range {offset}+{length} is beyond "
            f"{candidate} ({status.st_size} bytes)"
        )


def needs_external_data(model: onnx.ModelProto, loaded_with_external: bool) -> bool:
    """Keep weights in a side file when the source had one or protobuf cannot hold them."""
    return loaded_with_external or model.ByteSize() > PROTOBUF_LIMIT


def save_model_atomically(
    model: onnx.ModelProto,
    path: Path,
    external_data: bool,
    check: Callable[[Path], None],
) -> None:
    """Write `model` to `path` through a temporary folder beside it, check it, then rename.

    Nothing but the finished, checked file (and its `.data` side file) ever appears at the
    destination; a failure or Ctrl-C leaves the folder as it was.
    """
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder does not exist")
    try:
        staging = Path(tempfile.mkdtemp(prefix=".onnx-forget-", dir=folder))
    except OSError as error:
        raise InputError(f"{folder}: cannot write the output there ({error.strerror})") from None
    try:
        staged = staging / path.name
        data_name = path.name + ".data"
        try:
            if external_data:
                copy = onnx.ModelProto()
                copy.CopyFrom(model)
                onnx.save_model(
                    copy,
                    str(staged),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=data_name,
                )
            else:
                onnx.save_model(model, str(staged))
        except OSError as error:
            raise InputError(f"{path}: cannot write the output ({error.strerror})") from None
        except ValueError as error:
            raise UnsupportedModelError(f"{path}: cannot serialise the model ({error})") from None
        check(staged)
        if external_data:
            os.replace(staging / data_name, folder / data_name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write a small text file through a temporary file beside it and a rename."""
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: folder does not exist")
    handle, temporary = tempfile.mkstemp(prefix=".onnx-forget-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
