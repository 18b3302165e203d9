"""`--plot`: a PNG that decodes and shows something, the layout for many classes, the
output rules every output obeys, and a clear stop without matplotlib."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import onnx_forget
from onnx_forget import plot
from tests.helpers import (
    EXIT_USAGE,
    FAST,
    FIXTURES,
    HELD_OUT,
    MODEL,
    SAMPLES,
    listing,
    run_cli,
    sha256,
)

IMAGENET = {
    "model": FIXTURES / "imagenet_efficientnet_lite0.onnx",
    "samples": FIXTURES / "imagenet_photos" / "heldout",
    "class_names": FIXTURES / "imagenet_classes.txt",
    "preprocessing": onnx_forget.Preprocessing(scale=1.0, mean=(127.0,) * 3, std=(128.0,) * 3),
}
ESPRESSO = 967
# Fewer colours than this is a blank or nearly blank canvas; a chart's antialiased text
# and bars give hundreds.
MIN_COLOURS = 16


def _assert_picture(path: Path) -> None:
    """A PNG of a readable size with more than a few colours."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 800 <= width <= 4000 and 500 <= height <= 4000, image.size
        colours = image.convert("RGB").getcolors(maxcolors=width * height)
    assert len(colours) > MIN_COLOURS


@pytest.mark.usefixtures("one_blas_thread")
def test_forget_draws_the_held_out_comparison(tmp_path):
    process = run_cli(
        MODEL,
        "--forget-class", "3",
        "--samples", SAMPLES,
        "--eval-samples", HELD_OUT,
        "-o", tmp_path / "out.onnx",
        "--plot", tmp_path / "p.png",
        *FAST,
        cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    _assert_picture(tmp_path / "p.png")
    assert listing(tmp_path) == {"out.onnx", "p.png"}  # nothing staged is left


def test_evaluate_draws_the_reference_and_replaces_an_old_picture(tmp_path):
    picture = tmp_path / "p.png"
    picture.write_bytes(b"an older picture")
    process = run_cli(
        "evaluate", FIXTURES / "mnist_cnn_without_3.onnx",
        "--samples", HELD_OUT,
        "--reference", MODEL,
        "--forget-class", "3",
        "--plot", picture,
        cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    _assert_picture(picture)


def test_a_thousand_classes_are_summed_up_not_drawn_one_by_one(tmp_path, monkeypatch):
    layouts, choose = [], plot.choose_layout

    def recorded(class_count: int) -> str:
        layouts.append(choose(class_count))
        return layouts[-1]

    monkeypatch.setattr(plot, "choose_layout", recorded)
    evaluation = onnx_forget.evaluate(
        IMAGENET["model"],
        IMAGENET["samples"],
        forget_classes=[ESPRESSO],
        class_names=IMAGENET["class_names"],
        preprocessing=IMAGENET["preprocessing"],
        plot=tmp_path / "p.png",
    )
    assert layouts == [plot.MANY_CLASSES]
    assert evaluation.reference_accuracy is None
    _assert_picture(tmp_path / "p.png")


def test_the_layout_turns_to_a_summary_past_thirty_classes():
    assert plot.choose_layout(10) == plot.PER_CLASS
    assert plot.choose_layout(plot.MAX_CLASS_BARS) == plot.PER_CLASS
    assert plot.choose_layout(1000) == plot.MANY_CLASSES


@pytest.mark.parametrize("command", ["forget", "evaluate"])
def test_a_plot_over_the_model_is_refused(command, model, tmp_path):
    before = sha256(model)
    if command == "forget":
        args = [model, "--forget-class", "3", "--samples", SAMPLES, "-o", tmp_path / "out.onnx"]
    else:
        args = ["evaluate", model, "--samples", HELD_OUT, "--forget-class", "3"]
    process = run_cli(*args, "--plot", model, cwd=tmp_path)
    assert process.returncode == EXIT_USAGE, process.stderr
    assert "the plot would overwrite the model" in process.stderr
    assert sha256(model) == before
    assert listing(tmp_path) == {model.name}


@pytest.mark.parametrize("run", ["forget", "evaluate"])
def test_without_matplotlib_the_run_stops_before_reading_the_model(run, tmp_path, monkeypatch):
    """A missing model would be an InputError: the InstallationError comes first."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    missing = tmp_path / "missing.onnx"
    with pytest.raises(onnx_forget.InstallationError) as raised:
        if run == "forget":
            onnx_forget.forget(missing, 3, SAMPLES, plot=tmp_path / "p.png")
        else:
            onnx_forget.evaluate(missing, HELD_OUT, plot=tmp_path / "p.png")
    assert str(raised.value) == "--plot needs matplotlib: pip install 'onnx-forget[plot]'"
    assert raised.value.exit_code == 3
    assert listing(tmp_path) == set()


def test_a_plot_from_statistics_alone_is_refused_for_want_of_samples(tmp_path):
    with pytest.raises(onnx_forget.InputError, match="plot needs samples or eval_samples"):
        onnx_forget.forget(MODEL, 3, stats=tmp_path / "stats.npz", plot=tmp_path / "p.png")


def test_importing_the_package_imports_no_matplotlib():
    code = (
        "import sys, onnx_forget.api, onnx_forget.commands; assert 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
