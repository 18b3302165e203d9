"""What a run writes: checked against its inputs before any work, staged beside the
destinations, then renamed into place together."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx

from .errors import InputError, UnsupportedModelError

# Protobuf cannot serialise a message over 2 GiB; such models keep weights beside them.
PROTOBUF_LIMIT = 2**31 - 1
# The mode a new file is created with; the kernel applies the process's umask to it.
PLAIN_FILE_MODE = 0o666
# Staged files and folders: hidden, and named so a leftover is recognisable.
STAGING_PREFIX = ".onnx-forget-"
# Roles in `check_outputs`: a model's external-data side files go with it; a report or a
# plot may replace an existing file without `force`, as logs do.
MODEL_OUTPUT = "new model"
REPORT_OUTPUT = "report"
PLOT_OUTPUT = "plot"
REPLACED_WITHOUT_FORCE = (REPORT_OUTPUT, PLOT_OUTPUT)


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
    only allows replacing an existing file that is no input (a report or plot needs none).
    """
    written: list[tuple[str, Path]] = []
    for role, path in outputs.items():
        if path is None:
            continue
        if path.is_dir():
            raise InputError(f"{path}: is a folder, not a file name (the {role})")
        if not path.parent.is_dir():
            raise InputError(f"{path.parent}: folder of the {role} does not exist")
        if path.exists() and not (force or role in REPLACED_WITHOUT_FORCE):
            raise InputError(f"{path}: already exists (use force to replace it)", ("force",))
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
