"""The environment a run meets: onnxruntime's builds and IR versions, other libraries'
global settings, the process umask, the cores it may use."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import onnx
import pytest

import onnx_forget
from onnx_forget import outputs
from onnx_forget.cores import cgroup_cpu_quota, usable_cores
from onnx_forget.errors import VerificationError
from onnx_forget.runtime import TYPE_IR_VERSIONS, newest_ir_version, session_options
from tests.helpers import EXIT_UNSUPPORTED, FAST, FEW_SAMPLES, HELD_OUT, MODEL, SAMPLES, run_cli


def _newer_ir() -> int:
    """An IR version onnx writes and the installed onnxruntime does not read."""
    newer = newest_ir_version() + 1
    if newer > onnx.IR_VERSION:
        pytest.skip(f"onnxruntime reads every IR version onnx {onnx.__version__} writes")
    return newer


def test_a_model_of_a_newer_ir_runs_and_keeps_its_ir(tmp_path):
    """Nothing the newer IR added is used: onnxruntime runs a copy with the IR lowered,
    and the written model is still of the newer IR."""
    model = onnx.load(MODEL)
    model.ir_version = _newer_ir()
    onnx.save(model, tmp_path / "newer.onnx")
    process = run_cli(
        "newer.onnx", "--forget-class", "3", "--samples", SAMPLES, "-o", "out.onnx",
        "--eval-samples", HELD_OUT, *FAST, cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    written = onnx.load(tmp_path / "out.onnx")
    assert written.ir_version == model.ir_version
    assert written.opset_import == model.opset_import
    assert "held-out accuracy" in process.stdout


def test_a_model_using_what_a_newer_ir_added_names_both_versions(tmp_path):
    """An element type onnxruntime's IR lacks: one line naming both versions."""
    newer = _newer_ir()
    added = [number for number, version in TYPE_IR_VERSIONS.items() if version == newer]
    if not added:
        pytest.skip(f"IR {newer} added no element type")
    model = onnx.load(MODEL)
    model.ir_version = newer
    model.graph.initializer.append(onnx.helper.make_tensor("unused", added[0], [1], [0.0]))
    onnx.save(model, tmp_path / "newer.onnx")
    process = run_cli("newer.onnx", "--forget-class", "3", "--samples", SAMPLES, cwd=tmp_path)
    assert process.returncode == EXIT_UNSUPPORTED, process.stderr
    line = process.stderr.strip()
    assert len(process.stderr.splitlines()) == 1
    assert f"IR version {newer}" in line and f"IR {newest_ir_version()}" in line
    assert "upgrade onnxruntime" in line


def _fake_distribution(folder: Path, name: str) -> None:
    """The metadata of an installed distribution, as pip leaves it."""
    info = folder / f"{name.replace('-', '_')}-1.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")


def test_both_onnxruntime_builds_installed_is_one_line_and_exit_3(tmp_path):
    """onnxruntime and onnxruntime-gpu overwrite each other: said before either is imported."""
    builds = ("onnxruntime", "onnxruntime-gpu")
    installed = [name for name in builds if _installed(name)]
    assert installed, "no onnxruntime build installed"
    _fake_distribution(tmp_path / "site", next(n for n in builds if n not in installed))
    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    process = subprocess.run(
        [sys.executable, "-m", "onnx_forget", "layers", str(MODEL)],
        capture_output=True, text=True, env=environment, check=False,
    )  # fmt: skip
    assert process.returncode == EXIT_UNSUPPORTED, process.stderr
    assert len(process.stderr.splitlines()) == 1
    assert "onnxruntime 1.0.0" in process.stderr or "onnxruntime-gpu 1.0.0" in process.stderr
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in process.stderr


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


IMPORT_AND_RUN = """
import onnxruntime as ort
from onnx_graphsurgeon.logger import G_LOGGER
ort.set_default_logger_severity(0)
G_LOGGER.severity = G_LOGGER.VERBOSE
import onnx_forget
onnx_forget.layers({model!r})
print(G_LOGGER.severity == G_LOGGER.VERBOSE)
options = ort.SessionOptions()
ort.InferenceSession({model!r}, options, providers=["CPUExecutionProvider"])
"""


def test_importing_and_using_the_package_keeps_other_libraries_settings():
    """onnxruntime keeps logging at the level its user set (here: everything), and
    onnx-graphsurgeon keeps its severity."""
    process = subprocess.run(
        [sys.executable, "-c", IMPORT_AND_RUN.format(model=str(MODEL))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == ["True"]
    assert "onnxruntime" in process.stderr  # its verbose log lines, as its user asked


def test_written_files_follow_the_umask_which_is_never_changed(tmp_path, monkeypatch):
    """Outputs get the mode any new file gets, without the umask being toggled while other
    threads run."""
    mask = os.umask(0o027)
    try:

        def no_umask(_):
            raise AssertionError("os.umask called")

        monkeypatch.setattr(os, "umask", no_umask)
        model = Path(shutil.copy(MODEL, tmp_path / "model.onnx"))
        onnx_forget.forget(model, 3, SAMPLES, report=tmp_path / "report.json", **FEW_SAMPLES)
    finally:
        monkeypatch.undo()
        os.umask(mask)
    for name in ("model.forget-3.onnx", "report.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_a_checker_failure_of_any_kind_is_a_verification_error(tmp_path, monkeypatch):
    """The loader and the verifier read the checker's failures from one list: a
    RuntimeError while verifying the output is exit 4, not an internal error."""
    real_check = onnx.checker.check_model

    def failing_on_the_output(model, *args, **kwargs):
        if isinstance(model, str) and outputs.STAGING_PREFIX in model:
            raise RuntimeError("simulated checker failure")
        return real_check(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", failing_on_the_output)
    model = Path(shutil.copy(MODEL, tmp_path / "model.onnx"))
    with pytest.raises(VerificationError, match="simulated"):
        onnx_forget.forget(model, 3, SAMPLES, **FEW_SAMPLES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
    ids=["v2 limit", "v2 none", "v1 limit", "v1 none", "no cgroup"],
)
def test_the_cgroup_cpu_quota_caps_the_threads(tmp_path, files, quota):
    """A CPU limit (Kubernetes, docker --cpus) is read from cgroup v2 or v1 files."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota


def test_sessions_use_the_usable_cores_without_spinning():
    options = session_options()
    assert options.intra_op_num_threads == usable_cores() <= len(os.sched_getaffinity(0))
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
