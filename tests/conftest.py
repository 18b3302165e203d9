"""Shared paths and helpers: run the CLI as a user would, hash files, list folders."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODEL = FIXTURES / "mnist_cnn.onnx"
SAMPLES = FIXTURES / "mnist_samples"
HELD_OUT = FIXTURES / "mnist_heldout.npz"
# Enough samples for a run that works, few enough for ~2 s on 2 cores (accuracy aside).
FAST = ("--retain-per-class", "20", "--forget-samples", "20")
CLI_TIMEOUT_S = 120


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


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    """Every path under `folder`, hidden ones included, relative to it."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A private copy of the fixture CNN in `tmp_path`, so default outputs land there."""
    return Path(shutil.copy(MODEL, tmp_path / MODEL.name))


@pytest.fixture
def cli(tmp_path: Path):
    """`run_cli` with `tmp_path` as the working directory."""

    def run(*args) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=tmp_path)

    return run
