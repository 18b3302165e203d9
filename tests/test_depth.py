"""How deep a run projects: the last N layers, every layer, or a depth searched on
validation samples."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_forget
from onnx_forget.errors import InputError
from onnx_forget.layer_scan import scan_layers
from tests.helpers import HELD_OUT, MODEL, SAMPLES
from tests.models import float_weights

FEW = {"retain_per_class": 30, "forget_samples": 60, "device": "cpu"}


def test_depth_n_projects_only_the_last_n_layers(tmp_path):
    """Depth 2 on the CNN: its two Gemms change, its three convs keep every weight."""
    result = onnx_forget.forget(MODEL, 3, SAMPLES, depth=2, output=tmp_path / "out.onnx", **FEW)
    original = onnx.load(MODEL)
    before, after = float_weights(original), float_weights(result.model)
    layers = scan_layers(original).layers
    for layer in layers[:-2]:
        assert np.array_equal(after[layer.weight.tensor], before[layer.weight.tensor])
    for layer in layers[-2:]:
        assert not np.array_equal(after[layer.weight.tensor], before[layer.weight.tensor])
    assert [row["node"] for row in result.report.layers] == [layer.node for layer in layers[-2:]]
    assert result.report.depth["projected"] == 2 and result.report.depth["of"] == 5


def test_auto_depth_keeps_the_agreement_it_searched_for(tmp_path):
    """`auto` tries depths 1, 2, 4, ... on validation samples held out of `samples`, keeps
    the deepest whose kept-class agreement stays at the target, and reports each try."""
    result = onnx_forget.forget(
        MODEL, 3, SAMPLES, depth="auto", eval_samples=HELD_OUT, output=tmp_path / "o.onnx", **FEW
    )
    depth = result.report.depth
    tried = [trial["depth"] for trial in depth["trials"]]
    assert tried[0] == 1 and tried == sorted(tried)
    kept = [t for t in depth["trials"] if t["agreement"] >= 99.0]
    assert depth["projected"] == (kept[-1]["depth"] if kept else 1)
    held_out = result.report.comparisons[1]
    assert held_out.after.forget <= 1.0
    assert held_out.before.retain - held_out.after.retain <= 1.5


@pytest.mark.parametrize("depth", ["0", "-1", "deep", 0])
def test_a_depth_that_is_no_number_of_layers_is_refused(depth):
    with pytest.raises(InputError, match="depth must be all, auto or a number"):
        onnx_forget.forget(MODEL, 3, SAMPLES, depth=depth, **FEW)


def test_tune_searches_alpha_on_the_depth_it_searched_first(tmp_path):
    """Under `auto`, tune searches the depth at the default α, then α on those layers: its
    model is the one forget writes at that depth and the best α."""
    grid = {"alpha_r_grid": (30, 100), "alpha_f_grid": (3,)}
    tuned = onnx_forget.tune(
        MODEL, 3, SAMPLES, eval_samples=HELD_OUT, output=tmp_path / "tuned.onnx", **grid, **FEW
    )
    depth = tuned.result.report.depth
    assert depth["trials"] and depth["trials"][0]["depth"] == 1
    onnx_forget.forget(
        MODEL,
        3,
        SAMPLES,
        eval_samples=HELD_OUT,
        output=tmp_path / "forget.onnx",
        depth=depth["projected"],
        alpha_r=tuned.best["alpha_r"],
        alpha_f=tuned.best["alpha_f"],
        **FEW,
    )
    assert (tmp_path / "tuned.onnx").read_bytes() == (tmp_path / "forget.onnx").read_bytes()


def test_the_paper_method_projects_every_layer_under_auto(tmp_path):
    """`--method paper` stays the paper: no samples held back, every layer projected."""
    output = tmp_path / "out.onnx"
    result = onnx_forget.forget(MODEL, 3, SAMPLES, method="paper", output=output, **FEW)
    assert result.report.depth["projected"] == result.report.depth["of"] == 5
    assert not result.report.depth["trials"]
    assert result.report.samples["retain"] == 9 * FEW["retain_per_class"]


def test_statistics_without_validation_samples_project_every_layer(tmp_path):
    """A run from a statistics file alone has nothing to validate a depth on: every layer
    is projected, and the report says why."""
    stats = onnx_forget.collect(MODEL, SAMPLES, output=tmp_path / "s.npz", max_patches=64)
    output = tmp_path / "out.onnx"
    result = onnx_forget.forget(MODEL, 3, stats=stats, max_patches=64, output=output)
    assert result.report.depth["projected"] == 5
    assert result.report.depth["stopped"] == "no samples to validate a depth on"
