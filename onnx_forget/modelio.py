"""Safe loading of ONNX models, external weight files included.

Models come from other teams and tools, so a path is read as untrusted input: its size
is bounded, its external data must be plain files inside its folder and is read here,
never by onnx's loader, after every reference was checked, and it must pass the ONNX
checker.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from google.protobuf.message import DecodeError, Message

from .errors import InputError, UnsupportedModelError
from .options import DEFAULT_MAX_MODEL_BYTES

# The keys of the ONNX external data spec; "basepath" is onnx's in-memory bookkeeping and,
# in a file, could only move where the data is read from.
EXTERNAL_DATA_KEYS = {"location", "offset", "length", "checksum"}
# Element types ONNX defines; the checker lets any number through as an initializer's
# type or a graph input's or output's.
DATA_TYPES = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
DIGITS = re.compile(r"[0-9]+")
# Never follow a link when opening external data (0 where the platform has no such flag).
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
LIMIT_HINT = "raise max_model_bytes if it is meant to be this large"
LIMIT_OPTION = ("max_model_bytes",)
# What onnx's checker raises on a model it rejects; the loader and the verifier both use it.
CHECKER_ERRORS = (onnx.checker.ValidationError, ValueError, RuntimeError)


@dataclass
class LoadedModel:
    """A model in memory, with where it came from."""

    proto: onnx.ModelProto
    path: Path | None
    sha256: str  # the .onnx bytes, then its external data in the order tensors reference it
    external_files: tuple[Path, ...]  # the external data files read, inside the model's folder

    @property
    def has_external_data(self) -> bool:
        return bool(self.external_files)

    @property
    def where(self) -> str:
        """How messages name the model."""
        return str(self.path) if self.path is not None else "in-memory model"


@dataclass(frozen=True)
class _ExternalRange:
    """One tensor's bytes in an external data file, as its entries declare them."""

    tensor: onnx.TensorProto
    location: str
    offset: int
    length: int | None  # None: to the end of the file


def load_model(
    source: str | os.PathLike | onnx.ModelProto, max_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> LoadedModel:
    """Load a model from a path or take a ModelProto, refusing anything unsafe.

    A path is refused when it is not a regular file, is over `max_bytes` (external data
    included), is not ONNX, has external data that is not a plain file inside its folder
    or a range beyond that file, or fails the ONNX checker. External data is read only
    once every reference of the model has passed.
    """
    if isinstance(source, onnx.ModelProto):
        return _in_memory(source)
    path = Path(source)
    data = _read_model_file(path, max_bytes)
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise InputError(
            f"{path}: not an ONNX model, or a truncated one ({error}); export or copy it again"
        ) from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes); export or copy it again")
    ranges = [_external_range(t, path) for t in all_tensors(proto) if _is_external(t)]
    files = _check_external_files(ranges, path)
    external_bytes = sum(_range_length(r, files[r.location]) for r in ranges)
    if len(data) + external_bytes > max_bytes:
        raise InputError(
            f"{path}: the model and its external data hold {len(data) + external_bytes} "
            f"bytes, over the limit of {max_bytes}; {LIMIT_HINT}",
            LIMIT_OPTION,
        )
    # With external data the checker must be given the path to find the (checked) files.
    _check_model(str(path) if ranges else data, path)
    _check_types(proto, path)
    _read_external_data(ranges, files, path)
    identity = hashlib.sha256(data)
    for item in ranges:  # a model is its graph and its weights: both decide its identity
        identity.update(item.tensor.raw_data)
    external_files = tuple(dict.fromkeys(path.parent / item.location for item in ranges))
    return LoadedModel(proto, path, identity.hexdigest(), external_files)


def _in_memory(proto: onnx.ModelProto) -> LoadedModel:
    """A ModelProto has no folder its external data could be checked against: refused."""
    for tensor in all_tensors(proto):
        if _is_external(tensor):
            raise InputError(
                f"in-memory model: tensor {tensor.name!r} keeps its data in an external "
                "file; pass the model's path instead"
            )
    data = proto.SerializeToString()
    _check_model(data, "in-memory model")
    _check_types(proto, "in-memory model")
    return LoadedModel(proto, None, hashlib.sha256(data).hexdigest(), ())


def _read_model_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, read without reading more."""
    try:
        status = path.stat()
        if stat.S_ISDIR(status.st_mode):
            raise InputError(f"{path}: is a folder; give the .onnx file inside it")
        if not stat.S_ISREG(status.st_mode):
            raise InputError(f"{path}: not a regular file; give an .onnx file")
        if status.st_size > max_bytes:
            raise InputError(
                f"{path}: {status.st_size} bytes, over the limit of {max_bytes}; {LIMIT_HINT}",
                LIMIT_OPTION,
            )
        with path.open("rb") as stream:
            data = stream.read(max_bytes + 1)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the model path") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read the model ({error.strerror})") from None
    if len(data) > max_bytes:
        raise InputError(f"{path}: grew over the limit of {max_bytes} bytes while being read")
    if not data:
        raise InputError(f"{path}: empty file, not an ONNX model; export or copy it again")
    return data


def checker_problem(model: onnx.ModelProto | bytes | str) -> str | None:
    """What the ONNX checker finds wrong with a model (a path, bytes or a proto), or None."""
    try:
        onnx.checker.check_model(model)
    except CHECKER_ERRORS as error:
        return str(error)
    return None


def _check_model(model: bytes | str, where: Path | str) -> None:
    """The ONNX checker's verdict as an UnsupportedModelError (exit 3)."""
    problem = checker_problem(model)
    if problem is not None:
        raise UnsupportedModelError(
            f"{where}: fails the ONNX checker ({problem}); fix or re-export the model"
        )


def _check_types(proto: onnx.ModelProto, where: Path | str) -> None:
    """Refuse element types ONNX does not define, which no later step could map."""
    typed = [(t.name, t.data_type) for t in all_tensors(proto)]
    for value in (*proto.graph.input, *proto.graph.output):
        if value.type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED:
            typed.append((value.name, value.type.tensor_type.elem_type))
    for name, data_type in typed:
        if data_type not in DATA_TYPES:
            raise UnsupportedModelError(
                f"{where}: tensor {name!r} has data type {data_type}, which ONNX does not "
                "define; fix or re-export the model"
            )


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def all_tensors(message: Message) -> Iterator[onnx.TensorProto]:
    """Every TensorProto anywhere in a message: initializers, sparse tensors, node
    attributes, subgraphs, function bodies, training info, and any field ONNX adds.

    Walking every message field, rather than the places onnx's own helpers know, is what
    guarantees no external reference is left unchecked for a later reader to follow.
    """
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        for item in (value,) if isinstance(value, Message) else value:
            if isinstance(item, onnx.TensorProto):
                yield item
            else:
                yield from all_tensors(item)


def _external_range(tensor: onnx.TensorProto, path: Path) -> _ExternalRange:
    """A tensor's external data entries, refused unless they name a file inside the folder."""
    where = f"{path}: tensor {tensor.name!r}"
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in EXTERNAL_DATA_KEYS:
            raise InputError(
                f"{where}: unknown external data key {entry.key!r} (known: "
                f"{', '.join(sorted(EXTERNAL_DATA_KEYS))}); refusing the model"
            )
        if entry.key in entries:
            raise InputError(f"{where}: external data key {entry.key!r} given twice")
        entries[entry.key] = entry.value
    location = entries.get("location", "")
    if not _is_plain_relative(location):
        raise InputError(
            f"{where}: external data location {location!r} is outside the model's folder; "
            "keep the data file beside the model under a relative name without '..'"
        )
    numbers = {}
    for key in ("offset", "length"):
        if key in entries and not DIGITS.fullmatch(entries[key]):
            raise InputError(f"{where}: external data {key} {entries[key]!r} is not a number")
        numbers[key] = int(entries[key]) if key in entries else None
    return _ExternalRange(tensor, location, numbers["offset"] or 0, numbers["length"])


def _is_plain_relative(location: str) -> bool:
    """Relative on every platform, without '..' and without a NUL byte."""
    if not location or "\0" in location:
        return False
    for flavour in (PurePosixPath, PureWindowsPath):
        name = flavour(location)
        if name.anchor or ".." in name.parts:
            return False
    return True


def _check_external_files(ranges: list[_ExternalRange], path: Path) -> dict[str, os.stat_result]:
    """Status of every external data file: plain, single-linked, inside the folder; each
    range within its file. Nothing is opened, let alone read."""
    folder = path.parent.resolve()
    files: dict[str, os.stat_result] = {}
    for item in ranges:
        if item.location not in files:
            files[item.location] = _external_file(folder / item.location, folder, path)
        status = files[item.location]
        if item.offset + (item.length or 0) > status.st_size:
            raise InputError(
                f"{path}: tensor {item.tensor.name!r}: external data range {item.offset}+"
                f"{item.length or 0} is beyond {item.location!r} ({status.st_size} bytes); "
                "the data file does not belong to this model or was cut short"
            )
    return files


def _external_file(candidate: Path, folder: Path, path: Path) -> os.stat_result:
    where = f"{path}: external data file {candidate.name!r}"
    try:
        status = candidate.lstat()
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise InputError(f"{where} is missing; copy it beside the model") from None
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise InputError(f"{where} cannot be read ({error})") from None
    if stat.S_ISLNK(status.st_mode) or not resolved.is_relative_to(folder):
        raise InputError(
            f"{where} is a link or lies outside the model's folder; "
            "replace it with a plain copy of the data beside the model"
        )
    if not stat.S_ISREG(status.st_mode):
        raise InputError(f"{where} is not a regular file")
    if status.st_nlink > 1:
        raise InputError(
            f"{where} is a hard link (its data may live elsewhere); replace it with a plain copy"
        )
    return status


def _range_length(item: _ExternalRange, status: os.stat_result) -> int:
    return status.st_size - item.offset if item.length is None else item.length


def _read_external_data(
    ranges: list[_ExternalRange], files: dict[str, os.stat_result], path: Path
) -> None:
    """Read each checked range into its tensor, opening each file without following links
    and refusing it if it is no longer the file that was checked."""
    by_location: dict[str, list[_ExternalRange]] = defaultdict(list)
    for item in ranges:
        by_location[item.location].append(item)
    for location, items in by_location.items():
        checked = files[location]
        try:
            handle = os.open(path.parent / location, OPEN_FLAGS)
        except OSError as error:
            raise InputError(f"{path}: cannot open external data {location!r} ({error})") from None
        with os.fdopen(handle, "rb") as stream:
            opened = os.fstat(stream.fileno())
            if (opened.st_dev, opened.st_ino, opened.st_size) != (
                checked.st_dev,
                checked.st_ino,
                checked.st_size,
            ):
                raise InputError(f"{path}: external data {location!r} changed while being read")
            for item in items:
                stream.seek(item.offset)
                length = _range_length(item, checked)
                item.tensor.raw_data = stream.read(length)
                if len(item.tensor.raw_data) != length:
                    raise InputError(f"{path}: external data {location!r} was cut short")
                item.tensor.data_location = onnx.TensorProto.DEFAULT
                del item.tensor.external_data[:]
