"""Safe loading and atomic saving of ONNX models, external weight files included.

Models come from other teams and tools, so a path is read as untrusted input: its size
is bounded, its external data must be plain files inside its folder and is read here,
never by onnx's loader, after every reference was checked, and it must pass the ONNX
checker.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError, Message

from .errors import InputError, UnsupportedModelError
from .options import DEFAULT_MAX_MODEL_BYTES

# Protobuf cannot serialise a message over 2 GiB; such models keep weights beside them.
PROTOBUF_LIMIT = 2**31 - 1
# The keys of the ONNX external data spec; "basepath" is onnx's in-memory bookkeeping and,
# in a file, could only move where the data is read from.
EXTERNAL_DATA_KEYS = {"location", "offset", "length", "checksum"}
# Element types ONNX defines; the checker lets any number through as an initializer's
# type or a graph input's or output's.
DATA_TYPES = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
DIGITS = re.compile(r"[0-9]+")
# Never follow a link when opening external data (0 where the platform has no such flag).
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
LIMIT_HINT = "raise --max-model-bytes if it is meant to be this large"
# What onnx's checker raises on a model it rejects; the loader and the verifier both use it.
CHECKER_ERRORS = (onnx.checker.ValidationError, ValueError, RuntimeError)
# The mode a new file is created with; the kernel applies the process's umask to it.
PLAIN_FILE_MODE = 0o666
# Staged files and folders: hidden, and named so a leftover is recognisable.
STAGING_PREFIX = ".onnx-forget-"
# Roles in `check_outputs`: a model's external-data side files go with it; a report may
# replace an existing file without `force`, as logs do.
MODEL_OUTPUT = "new model"
REPORT_OUTPUT = "report"


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
            f"bytes, over the limit of {max_bytes}; {LIMIT_HINT}"
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
                f"{path}: {status.st_size} bytes, over the limit of {max_bytes}; {LIMIT_HINT}"
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


def check_outputs(
    outputs: Mapping[str, Path | None],
    inputs: Mapping[str, Iterable[Path]],
    force: bool,
) -> None:
    """Refuse, before any work, an output that cannot be written or would touch an input.

    `outputs` and `inputs` map what a path is ("report", "the samples") to it; the
    MODEL_OUTPUT also replaces its side files (`side_files`). An output clashes with an
    input it names through any path, link or hard link, with a file inside an input
    folder, and with another output. A clash is refused whatever `force` says; `force`
    only allows replacing an existing file that is no input (a report needs no `force`).
    """
    written: list[tuple[str, Path]] = []
    for role, path in outputs.items():
        if path is None:
            continue
        if path.is_dir():
            raise InputError(f"{path}: is a folder, not a file name (the {role})")
        if not path.parent.is_dir():
            raise InputError(f"{path.parent}: folder of the {role} does not exist")
        if path.exists() and not (force or role == REPORT_OUTPUT):
            raise InputError(f"{path}: already exists (use --force to replace it)")
        replaced = [path, *side_files(path)] if role == MODEL_OUTPUT else [path]
        for target in replaced:
            for other_role, other in [*written, *_inputs(inputs)]:
                if _same_or_inside(target, other):
                    raise InputError(
                        f"{path}: the {role} would overwrite {other_role} ({other}); "
                        "write it somewhere else"
                    )
        written += [(f"the {role}", target) for target in replaced]


def _inputs(inputs: Mapping[str, Iterable[Path]]) -> Iterator[tuple[str, Path]]:
    for role, paths in inputs.items():
        for path in paths:
            yield role, Path(path)


def _same_or_inside(output: Path, other: Path) -> bool:
    """Whether writing `output` could change `other`: the same file by any name, or a file
    inside the folder `other`."""
    target, resolved = output.resolve(), other.resolve()
    if target == resolved or (resolved.is_dir() and target.is_relative_to(resolved)):
        return True
    try:
        return os.path.samefile(output, other)
    except OSError:  # either does not exist (yet): no hard link can join them
        return False


def side_files(path: Path) -> list[Path]:
    """The external-data files beside a model output, as this tool names them:
    `<name>.data`, or `<name>.<12 hex digits>.data` when it replaced an existing pair."""
    pattern = re.compile(re.escape(path.name) + r"(\.[0-9a-f]{12})?\.data")
    plain = path.with_name(path.name + ".data")
    try:
        found = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        found = []
    return sorted({plain, *found})


def needs_external_data(model: onnx.ModelProto, loaded_with_external: bool) -> bool:
    """Keep weights in a side file when the source had one or protobuf cannot hold them."""
    return loaded_with_external or model.ByteSize() > PROTOBUF_LIMIT


@dataclass
class _Move:
    staged: Path
    destination: Path
    undo: bool  # remove the destination again if the commit stops before its pair lands
    landed: bool = False


class OutputFiles:
    """A run's outputs, staged beside their destinations and renamed into place together.

    Nothing appears at a destination before `commit`. Leaving the block without it (an
    error, a failed check, Ctrl-C) removes every staged file. `commit` renames a model's
    external data first, then the model, then the other files in the order added; a model
    replacing an existing pair writes its data under a fresh name, so the old `.onnx` reads
    its old data until the new `.onnx` replaces it in one rename.
    """

    def __init__(self):
        self._moves: list[_Move] = []
        self._staging: list[Path] = []
        self._obsolete: list[Path] = []

    def __enter__(self) -> OutputFiles:
        return self

    def __exit__(self, *exception) -> None:
        for move in self._moves:
            if move.landed and move.undo:
                move.destination.unlink(missing_ok=True)
        for staged in self._staging:
            if staged.is_dir():
                shutil.rmtree(staged, ignore_errors=True)
            else:
                staged.unlink(missing_ok=True)

    def add_model(
        self,
        model: onnx.ModelProto,
        path: Path,
        external_data: bool,
        check: Callable[[Path], None],
    ) -> None:
        """Write `model` (and its external data) into a staging folder beside `path`, then
        `check` the staged file."""
        staging = self._staged(
            path.parent, lambda prefix: Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        )
        staged = staging / path.name
        data_name = _data_name(path) if external_data else None
        try:
            if data_name is not None:
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
        if data_name is not None:
            self._moves.append(_Move(staging / data_name, path.parent / data_name, True))
        self._moves.append(_Move(staged, path, False))
        self._obsolete += [p for p in side_files(path) if p.name != data_name]

    def add_file(self, path: Path, write: Callable[[BinaryIO], object]) -> None:
        """Stage a file beside `path` written by `write`."""

        def create(prefix: str) -> Path:
            staged = path.parent / f"{prefix}{secrets.token_hex(8)}"
            # The kernel applies the umask to PLAIN_FILE_MODE, as for any new file.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            os.close(os.open(staged, flags | getattr(os, "O_NOFOLLOW", 0), PLAIN_FILE_MODE))
            return staged

        staged = self._staged(path.parent, create)
        try:
            with staged.open("r+b") as stream:
                write(stream)
        except OSError as error:
            raise InputError(f"{path}: cannot write it ({error.strerror})") from None
        self._moves.append(_Move(staged, path, False))

    def add_text(self, path: Path, text: str) -> None:
        self.add_file(path, lambda stream: stream.write(text.encode()))

    def _staged(self, folder: Path, create: Callable[[str], Path]) -> Path:
        if not folder.is_dir():
            raise InputError(f"{folder}: output folder does not exist")
        try:
            staged = create(STAGING_PREFIX)
        except OSError as error:
            raise InputError(f"{folder}: cannot write there ({error.strerror})") from None
        self._staging.append(staged)
        return staged

    def commit(self) -> None:
        """Rename every staged file into place, then remove what the new model replaced."""
        for move in self._moves:
            os.replace(move.staged, move.destination)
            move.landed = True
            if not move.undo:  # a model landed: its data is no longer an orphan
                for earlier in self._moves:
                    earlier.undo = False
        for path in self._obsolete:
            path.unlink(missing_ok=True)


def _data_name(path: Path) -> str:
    """`<name>.data`, or a fresh name while an existing `<name>` may still read that file."""
    plain = path.name + ".data"
    if path.exists() and (path.parent / plain).exists():
        return f"{path.name}.{secrets.token_hex(6)}.data"
    return plain


def write_file_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write one file through a staged file beside it and a rename."""
    with OutputFiles() as outputs:
        outputs.add_file(path, write)
        outputs.commit()
