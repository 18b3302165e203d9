"""Paths, constants and helpers shared by the test files.

Run the CLI as a user would (one at a time or many in parallel), hash and list folders,
check a refused run from every side, and build the small inputs many tests feed it: the
fixture CNN saved as it is or with external data, class folders of fixture digits.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODEL = FIXTURES / "mnist_cnn.onnx"
SAMPLES = FIXTURES / "mnist_samples"
HELD_OUT = FIXTURES / "mnist_heldout.npz"
EXTERNAL = FIXTURES / "mnist_cnn_external"  # the fixture CNN with its weights in a side file

# Enough samples for a run that works, few enough for ~2 s on 2 cores (accuracy aside).
FAST = ("--retain-per-class", "20", "--forget-samples", "20")
# Runs that are refused or whose accuracy is not the point: as few samples as work...
FEW = ("--retain-per-class", "5", "--forget-samples", "5")
# ... and the same counts as keyword arguments of the Python API.
FEW_SAMPLES = {"retain_per_class": 5, "forget_samples": 5}
CLI_TIMEOUT_S = 120

PROGRAM = "onnx-forget"
EXIT_USAGE, EXIT_UNSUPPORTED, EXIT_INTERRUPTED = 2, 3, 130

# The bytes of a file outside a model's folder that no external reference may reach.
SECRET = b"outside the model's folder " * 64


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m onnx_forget ARGS` in `cwd`, stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "onnx_forget", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def run_cli_in_parallel(runs: Iterable[tuple[list, Path]]) -> list[subprocess.CompletedProcess]:
    """`run_cli(*args, cwd=folder)` for each `(args, folder)`, as many at a time as there
    are cores, each CLI with one OpenBLAS thread; the processes in the order given."""
    runs = list(runs)
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(os.cpu_count()) as pool:
        patch.setenv("OPENBLAS_NUM_THREADS", "1")
        return list(pool.map(lambda run: run_cli(*run[0], cwd=run[1]), runs))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    """Every path under `folder`, hidden ones included, relative to it."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


def snapshot(folder: Path) -> dict[str, str | None]:
    """Every path under `folder` with its file's SHA-256 (links: their target; folders:
    None)."""
    state = {}
    for name in listing(folder):
        path = folder / name
        if path.is_symlink():
            state[name] = "-> " + os.readlink(path)
        else:
            state[name] = sha256(path) if path.is_file() else None
    return state


def forget_args(model, samples=SAMPLES, *extra) -> list:
    """The CLI arguments that forget class 3 of `model` with `FEW` samples."""
    return [model, "--forget-class", "3", "--samples", samples, *FEW, *extra]


def fixture_model() -> onnx.ModelProto:
    """The fixture CNN, loaded."""
    return onnx.load(MODEL)


def save_proto(proto: onnx.ModelProto, tmp: Path, name: str) -> str:
    """Write the proto's bytes as they are (no checker, no external data handling) to
    `tmp / name`; `name`."""
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return name


def external_model(folder: Path) -> tuple[Path, onnx.ModelProto]:
    """The fixture CNN in `folder`, every weight in `model.onnx.data`; the stored proto."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        fixture_model(),
        path,
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    return path, onnx.load(path, load_external_data=False)


def secret_file(tmp: Path) -> Path:
    """`tmp / "secret.bin"` holding `SECRET`: a file outside the model's folder that no
    external reference may reach."""
    path = tmp / "secret.bin"
    path.write_bytes(SECRET)
    return path


def png_folder(root: Path, classes=(3, 4), per_class: int = 5) -> Path:
    """A class-per-folder copy of the first `per_class` fixture digits of `classes`."""
    for label in classes:
        (root / str(label)).mkdir(parents=True)
        for source in sorted((SAMPLES / str(label)).iterdir())[:per_class]:
            shutil.copy(source, root / str(label) / source.name)
    return root


def save_model(model, path, external_data, check) -> None:
    """Stage, check and commit one model, as a forget run writes its output."""
    from onnx_forget.outputs import OutputFiles  # here: helpers import no package module

    with OutputFiles() as files:
        files.add_model(model, path, external_data, check)
        files.commit()


def run_model(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    """The first output of `model` (in memory or a file) fed `x` as its one input, on the
    CPU provider of onnxruntime."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# --- refused CLI runs, checked from every side ----------------------------------------


def setup_id(setup: Callable) -> str:
    """The test id of a refusal case: its setup's name without the underscores."""
    return setup.__name__.strip("_")


def refusal_case(setup: Callable, folder: Path) -> tuple[list, int, tuple[str, ...]]:
    """A setup's CLI arguments, exit code and mentions; an external data setup only
    names its model, which `forget` must refuse for its references."""
    made = setup(folder)
    if isinstance(made, str):
        return forget_args(made), EXIT_USAGE, (made, "external data")
    return made


@dataclass
class Refusal:
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
        assert snapshot(self.folder) == self.before
