"""Faults while a run is under way, and what they leave behind.

A full disk (a file size limit making the output's write fail midway, or a writer that
fails with ENOSPC) or Ctrl-C while the model is written or checked leaves no partial
file; SIGINT while samples are being run exits 130 with one line and writes nothing; and
onnxruntime's CUDA provider failing (faked: when the session starts, when it runs, or
only on the Gram products) is refused naming the provider with `--device cuda`, while
`--device auto` says why and falls back to the CPU run's weights.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

import onnx_forget
from onnx_forget import runtime
from onnx_forget.errors import InputError, UnsupportedModelError
from tests.helpers import (
    CLI_TIMEOUT_S,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    FEW_SAMPLES,
    MODEL,
    PROGRAM,
    SAMPLES,
    fixture_model,
    forget_args,
    save_model,
    snapshot,
)

POLL_S = 0.002

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def test_writes_that_fail_like_a_full_disk_leave_nothing(tmp_path, model):
    """The file size limit makes the output's write fail midway (EFBIG, as ENOSPC would):
    exit 2 naming the output, and no partial file."""
    limit = model.stat().st_size // 4

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = snapshot(tmp_path)
    process = subprocess.run(
        [sys.executable, "-m", "onnx_forget", *map(str, forget_args(model.name)), "-o", "out.onnx"],
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
    assert snapshot(tmp_path) == before


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
        save_model(fixture_model(), tmp_path / "out.onnx", external_data, lambda p: None)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_checking_the_written_file_leaves_no_file(tmp_path):
    """Ctrl-C after the bytes are written but before the rename: nothing remains."""

    def interrupted(staged: Path):
        assert staged.is_file()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_model(fixture_model(), tmp_path / "out.onnx", True, interrupted)
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
    before = snapshot(tmp_path)
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
    assert snapshot(tmp_path) == before


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

    def disable_fallback(self):
        self.real.disable_fallback()

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
    options = {**FEW_SAMPLES, "method": "paper"}
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
