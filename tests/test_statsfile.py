"""Per-class statistics files: round trip, merging shards, forgetting without samples."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import onnx_forget
from onnx_forget.errors import InputError
from onnx_forget.gram_file import load_statistics
from tests.helpers import HELD_OUT, MODEL
from tests.models import ON_CPU, float_weights, largest_relative_difference

PER_CLASS = 15


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """`PER_CLASS` held-out digits of each class, as (x, y) arrays."""
    with np.load(HELD_OUT) as archive:
        x, y = archive["x"], archive["y"]
    chosen = np.concatenate([np.flatnonzero(y == c)[:PER_CLASS] for c in range(10)])
    return x[chosen], y[chosen]


def test_statistics_round_trip_through_a_file(tmp_path, digits):
    collected = onnx_forget.collect(MODEL, digits, classes=[1, 3, 7])
    collected.save(tmp_path / "stats.npz")
    loaded = load_statistics(tmp_path / "stats.npz")
    assert loaded.samples == {1: PER_CLASS, 3: PER_CLASS, 7: PER_CLASS}
    assert loaded.statistics == collected.statistics and loaded.options == collected.options
    for key, gram in collected.grams.items():
        assert np.array_equal(loaded.grams[key], gram)
        assert loaded.vectors[key] == collected.vectors[key]


def test_merge_of_two_shards_equals_one_collection_over_both(tmp_path, digits):
    """With every patch, Gram matrices are plain sums over samples: shards add up, to the
    float32 rounding of each batch's products (the shards batch the samples differently)."""
    x, y = digits
    halves = [np.arange(len(y)) % 2 == parity for parity in (0, 1)]
    for name, half in zip(("a", "b"), halves):
        part = onnx_forget.collect(MODEL, (x[half], y[half]), max_patches=0, **ON_CPU)
        part.save(tmp_path / f"{name}.npz")
    merged = onnx_forget.merge([tmp_path / "a.npz", tmp_path / "b.npz"])
    whole = onnx_forget.collect(MODEL, (x, y), max_patches=0, **ON_CPU)
    assert merged.samples == whole.samples
    for key, gram in whole.grams.items():
        assert np.max(np.abs(merged.grams[key] - gram)) <= 1e-6 * np.max(np.abs(gram))
        assert merged.vectors[key] == whole.vectors[key]


def test_forgetting_from_statistics_equals_forgetting_from_samples(tmp_path, digits):
    """Same samples, same options (patch sampling included): the same weights, to float32
    rounding (collection batches each class apart, a forget run batches each set)."""
    onnx_forget.collect(MODEL, digits, **ON_CPU).save(tmp_path / "stats.npz")
    from_stats = onnx_forget.forget(
        MODEL, 3, stats=tmp_path / "stats.npz", output=tmp_path / "a.onnx"
    )
    assert from_stats.report.options["method"] == "paper"  # the head repair needs samples
    from_samples = onnx_forget.forget(
        MODEL, 3, digits, output=tmp_path / "b.onnx", method="paper", **ON_CPU
    )
    difference = largest_relative_difference(
        float_weights(from_stats.model), float_weights(from_samples.model)
    )
    assert difference <= 1e-6
    original = float_weights(onnx.load(MODEL))
    assert largest_relative_difference(float_weights(from_stats.model), original) > 1e-3


def test_statistics_of_another_model_are_refused(tmp_path, digits):
    onnx_forget.collect(MODEL, digits, classes=[2, 3]).save(tmp_path / "stats.npz")
    other = onnx.load(MODEL)
    other.graph.initializer[0].raw_data = bytes(len(other.graph.initializer[0].raw_data))
    onnx.save(other, tmp_path / "other.onnx")
    with pytest.raises(InputError, match="another model"):
        onnx_forget.forget(tmp_path / "other.onnx", 3, stats=tmp_path / "stats.npz")


@pytest.mark.parametrize(
    ("first", "message"),
    [
        ({"seed": 1}, r"options differ: seed is 0, 1 in .*a\.npz"),
        ({"max_patches": 10_000}, r"options differ: max_patches is 2000, 10000 in .*a\.npz"),
    ],
)
def test_merge_refuses_statistics_collected_with_other_options(tmp_path, digits, first, message):
    """The error names the option, so that files collected before a default changed
    (the patch budget's, 10,000 to 2,000) say how to collect a match."""
    onnx_forget.collect(MODEL, digits, classes=[1], **first).save(tmp_path / "a.npz")
    onnx_forget.collect(MODEL, digits, classes=[2]).save(tmp_path / "b.npz")
    with pytest.raises(InputError, match=message):
        onnx_forget.merge([tmp_path / "a.npz", tmp_path / "b.npz"])


def test_merge_names_an_option_only_one_file_has(tmp_path, digits):
    """Option sets of different keys (a file from another version) are named too, even
    where the extra key holds None."""
    onnx_forget.collect(MODEL, digits, classes=[1]).save(tmp_path / "a.npz")
    b = onnx_forget.collect(MODEL, digits, classes=[2])
    b.options["added later"] = None
    b.save(tmp_path / "b.npz")
    with pytest.raises(InputError, match="options differ: added later is None, absent in"):
        onnx_forget.merge([tmp_path / "a.npz", tmp_path / "b.npz"])


def test_statistics_file_is_never_unpickled(tmp_path):
    """An object array where the header should be is refused, not loaded."""
    np.savez(tmp_path / "evil.npz", header=np.array([{"format": 1}], dtype=object))
    with pytest.raises(InputError, match="not a readable statistics file"):
        load_statistics(tmp_path / "evil.npz")


def _header_variants(good: dict) -> dict[str, object]:
    """Headers that parse as JSON but are not what `save` writes."""
    first, *rest = good["statistics"]
    return {
        "a-list": [1, 2],
        "no-samples": {k: v for k, v in good.items() if k != "samples"},
        "samples-not-counts": {**good, "samples": {"3": "many"}},
        "samples-not-classes": {**good, "samples": {"cat": 3}},
        "statistic-without-d": {**good, "statistics": [{"groups": 1}]},
        "statistic-of-size-zero": {**good, "statistics": [{**first, "d": 0}]},
        "wrong-d": {**good, "statistics": [{**first, "d": first["d"] + 1}, *rest]},
        "model-not-text": {**good, "model_sha256": 7},
    }


@pytest.mark.parametrize(
    "variant",
    ["a-list", "no-samples", "samples-not-counts", "samples-not-classes", "statistic-without-d",
     "statistic-of-size-zero", "wrong-d", "model-not-text"],
)  # fmt: skip
def test_malformed_statistics_header_is_a_usage_error(tmp_path, digits, variant):
    """Any header `save` would not write is exit 2 naming the file, never an internal error."""
    onnx_forget.collect(MODEL, digits, classes=[3, 4]).save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    good = json.loads(str(arrays["header"]))
    arrays["header"] = np.array(json.dumps(_header_variants(good)[variant]))
    np.savez(tmp_path / "bad.npz", **arrays)
    process = subprocess.run(
        [sys.executable, "-m", "onnx_forget", MODEL, "--forget-class", "3", "--stats",
         tmp_path / "bad.npz", "-o", tmp_path / "out.onnx"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert process.returncode == 2, process.stderr
    assert process.stderr.startswith("onnx-forget: error: ") and "bad.npz" in process.stderr
    assert len(process.stderr.splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()
