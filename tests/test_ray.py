"""Statistics collected on a local Ray cluster of 2 CPUs, with 2 workers, against the
single-process `collect`: the same numbers, and the same model forgotten from them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import ray

import onnx_forget
import onnx_forget.ray as forget_ray
from tests.helpers import MODEL, SAMPLES
from tests.models import float_weights, largest_relative_difference


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _largest_gram_difference(a, b) -> float:
    assert a.samples == b.samples and a.vectors == b.vectors and a.statistics == b.statistics
    return max(np.max(np.abs(a.grams[k] - g)) / np.max(np.abs(g)) for k, g in b.grams.items())


def test_ray_statistics_equal_collect_and_forget_the_same(cluster, tmp_path):
    """Every patch: equal to float32 rounding (a Ray chunk ends a float32 run of sums,
    `collect` runs on across its batches); the paper's method from them gives the model
    forgetting from the samples gives."""
    dataset = forget_ray.folder_dataset(SAMPLES, MODEL)
    on_ray = forget_ray.collect(dataset, MODEL, max_patches=0, workers=2)
    alone = onnx_forget.collect(MODEL, SAMPLES, max_patches=0)
    assert _largest_gram_difference(on_ray, alone) <= 1e-6
    from_ray = onnx_forget.forget(MODEL, 3, stats=on_ray, output=tmp_path / "a.onnx")
    from_samples = onnx_forget.forget(
        MODEL, 3, SAMPLES, method="paper", max_patches=0, output=tmp_path / "b.onnx"
    )
    # A forget run batches its retain and forget sets, collect each class: float32 rounding.
    difference = largest_relative_difference(
        float_weights(from_ray.model), float_weights(from_samples.model)
    )
    assert difference <= 1e-6
    original = float_weights(onnx.load(MODEL))
    assert largest_relative_difference(float_weights(from_ray.model), original) > 1e-3


def test_sampled_patches_do_not_depend_on_the_workers(cluster):
    """Patches are drawn per class over the class's sample order: 2 workers on a shuffled
    dataset of 3 classes draw what one process draws."""
    dataset = forget_ray.folder_dataset(SAMPLES, MODEL).random_shuffle(seed=5)
    on_ray = forget_ray.collect(dataset, MODEL, classes=[0, 3, 8], per_class=40, workers=2)
    alone = onnx_forget.collect(MODEL, SAMPLES, classes=[0, 3, 8], per_class=40)
    assert _largest_gram_difference(on_ray, alone) <= 1e-9
