"""Pytest fixtures shared by the test files; shared helpers and constants are in helpers.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import (
    MODEL,
    Refusal,
    refusal_case,
    run_cli,
    run_cli_in_parallel,
    setup_id,
    snapshot,
)


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


@pytest.fixture
def one_blas_thread(monkeypatch):
    """OpenBLAS threads spin against any other process on a small machine (30 s instead
    of 2 s for one decomposition); every CLI run of a test using this gets one thread."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def refusals(request, tmp_path_factory) -> dict:
    """Every refusal case the session selected in this module (the `setup` parameters of
    its tests that take this fixture), run once each, as many at a time as there are
    cores: a refused run is mostly the CLI starting, and there are dozens of them.

    Each setup gets a folder of its own holding a copy of the fixture CNN, and returns
    the CLI arguments, the exit code and what the error line must mention (see
    `refusal_case`); by setup, a `Refusal` whose `check()` the test calls."""
    wanted = {
        item.callspec.params["setup"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and "refusals" in item.fixturenames
        and hasattr(item, "callspec")
    }
    cases = {}
    for setup in wanted:
        folder = tmp_path_factory.mktemp(setup_id(setup))
        shutil.copy(MODEL, folder / MODEL.name)
        cases[setup] = Refusal(folder, *refusal_case(setup, folder), before=snapshot(folder))
    runs = run_cli_in_parallel((case.args, case.folder) for case in cases.values())
    for case, process in zip(cases.values(), runs):
        case.process = process
    return cases
