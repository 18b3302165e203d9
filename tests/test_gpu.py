"""The CUDA path: the same run on the GPU and the CPU, and the CPU fallback without a GPU.

Tests marked `gpu` need onnxruntime's CUDA provider to really start; elsewhere they skip
with the reason. The fallback tests run where it does not start.
"""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest

import onnx_forget
from onnx_forget.runtime import CPU, CUDA, cuda_starts
from tests.conftest import FAST, MODEL, SAMPLES
from tests.models import float_weights, largest_relative_difference

OPTIONS = {"retain_per_class": 20, "forget_samples": 20, "method": "paper"}
WEIGHT_TOLERANCE = 1e-4  # issue 6: CUDA weights match the CPU's to 1e-4 relative

needs_cuda = pytest.mark.skipif(
    not cuda_starts(), reason="onnxruntime's CUDA provider does not start here"
)
without_cuda = pytest.mark.skipif(cuda_starts(), reason="a GPU is present: no fallback")


@pytest.mark.gpu
@needs_cuda
def test_cuda_run_matches_the_cpu_run():
    """Collection on the CUDA provider gives the CPU run's weights to 1e-4 relative."""
    model = onnx.load(MODEL)  # in memory: nothing is written
    on_gpu = onnx_forget.forget(model, 3, SAMPLES, device="cuda", **OPTIONS)
    on_cpu = onnx_forget.forget(model, 3, SAMPLES, device="cpu", **OPTIONS)
    assert on_gpu.report.provider == CUDA and on_cpu.report.provider == CPU
    gpu, cpu = float_weights(on_gpu.model), float_weights(on_cpu.model)
    assert largest_relative_difference(gpu, cpu) <= WEIGHT_TOLERANCE


@without_cuda
def test_auto_without_a_gpu_runs_on_the_cpu_with_one_info_line(cli, model, tmp_path):
    """`--device auto` where CUDA does not start: exit 0, nothing on stderr, the CPU run's
    weights, and the summary's provider line says why when this onnxruntime lists CUDA."""
    auto = cli(model.name, "--forget-class", "3", "--samples", SAMPLES, *FAST,
               "--out", "auto.onnx", "--report", "auto.json")  # fmt: skip
    assert auto.returncode == 0, auto.stderr
    assert auto.stderr == ""
    notices = [line for line in auto.stdout.splitlines() if "CUDA" in line]
    assert len(notices) == (CUDA in ort.get_available_providers()), auto.stdout
    assert all(line.startswith(f"provider   {CPU} (") for line in notices)
    report = json.loads((tmp_path / "auto.json").read_text())
    assert report["provider"] == CPU
    cpu = cli(model.name, "--forget-class", "3", "--samples", SAMPLES, *FAST, "-q",
              "--device", "cpu", "--out", "cpu.onnx")  # fmt: skip
    assert cpu.returncode == 0, cpu.stderr
    assert (tmp_path / "auto.onnx").read_bytes() == (tmp_path / "cpu.onnx").read_bytes()
