"""The CUDA path: the same run on the GPU and the CPU, the CPU fallback without a GPU, and
the pieces CUDA uses (onnxruntime's Gram products, running ahead) checked on the CPU.

Tests marked `gpu` need onnxruntime's CUDA provider to really start; elsewhere they skip
with the reason. The fallback tests run where it does not start.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnx_forget
from onnx_forget.gram import StatisticsCollector
from onnx_forget.layer_scan import scan_layers
from onnx_forget.runtime import CPU, CUDA, cuda_starts, onnxruntime_gram, open_runner
from onnx_forget.taps import add_taps
from tests import models
from tests.helpers import FAST, FIXTURES, MODEL, SAMPLES
from tests.models import float_weights, largest_relative_difference

OPTIONS = {"retain_per_class": 20, "forget_samples": 20, "method": "paper"}
WEIGHT_TOLERANCE = 1e-4  # the bar for CUDA: its weights match the CPU's to 1e-4 relative
# Both sum float32 products of the same rows into float64; only the summation order differs.
GRAM_TOLERANCE = 1e-6

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


@pytest.mark.parametrize("budget", [0, 40])
def test_gram_products_through_onnxruntime_equal_numpys(budget):
    """The Gram products CUDA runs (an onnxruntime MatMul, here on the CPU provider) give
    numpy's matrices: grouped strided conv patches, all or sampled, and fully connected
    rows alike."""
    model = models.mixed_model(models.mixed_weights())
    layers = scan_layers(model).layers
    session = ort.InferenceSession(
        add_taps(model, layers, "scores").SerializeToString(), providers=[CPU]
    )
    names = [output.name for output in session.get_outputs()]
    labels = np.repeat([0, 1], 6)
    inputs = np.random.default_rng(0).normal(size=(12, *models.MIXED_INPUT)).astype(np.float32)
    groups_seen, on_cpu = set(), onnxruntime_gram(CPU)

    def update(rows: np.ndarray, sums: np.ndarray) -> None:
        groups_seen.add(len(rows))
        on_cpu(rows, sums)

    through_numpy = StatisticsCollector(layers, {"set": labels}, budget, seed=0)
    through_onnxruntime = StatisticsCollector(
        layers, {"set": labels}, budget, seed=0, update=update
    )
    for first, batch in ((0, inputs[:5]), (5, inputs[5:])):  # batches of 5 and 7
        tapped = dict(zip(names, session.run(None, {"input": batch})))
        through_numpy.add("set", tapped, first)
        through_onnxruntime.add("set", tapped, first)
    assert groups_seen == {1, models.CONV_GROUPS}  # fully connected and grouped conv rows
    for key in through_numpy.accumulators:
        expected = through_numpy.gram(key, "set")
        difference = np.abs(through_onnxruntime.gram(key, "set") - expected).max()
        assert difference <= GRAM_TOLERANCE * np.abs(expected).max(), key


@pytest.mark.parametrize(("model", "fixed_batch"), [("mnist_cnn", None), ("mnist_cnn_batch8", 8)])
def test_running_ahead_yields_each_batch_once_in_order(model, fixed_batch):
    """The CUDA runner's schedule, the next batch run while the caller holds this one,
    here on the CPU: the same batches and outputs as running each in turn, padding cut."""
    inputs = np.random.default_rng(0).random((21, 1, 28, 28), dtype=np.float32)
    indices = np.arange(len(inputs))[::-1]

    def batches(runs_ahead: bool) -> list:
        runner = open_runner(str(FIXTURES / f"{model}.onnx"), "cpu", 5, fixed_batch, "input")
        runner.runs_ahead = runs_ahead
        return list(runner.run(lambda batch: inputs[batch], indices))

    ahead, in_turn = batches(True), batches(False)
    assert len(ahead) == len(in_turn) == -(-len(inputs) // (fixed_batch or 5))
    np.testing.assert_array_equal(np.concatenate([batch for batch, _ in ahead]), indices)
    for (batch, outputs), (expected_batch, expected) in zip(ahead, in_turn):
        np.testing.assert_array_equal(batch, expected_batch)
        assert [o.shape[0] for o in outputs] == [len(batch)] * len(outputs)
        for output, want in zip(outputs, expected):
            np.testing.assert_array_equal(output, want)
