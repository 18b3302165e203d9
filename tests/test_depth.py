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


def test_tune_does_not_search_depth():
    with pytest.raises(InputError, match="tune searches alpha, not depth"):
        onnx_forget.tune(MODEL, 3, SAMPLES, depth="auto", **FEW)
