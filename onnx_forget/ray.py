"""Statistics collected on a Ray cluster (the optional `[ray]` extra; Ray is imported only
here). The samples are a Ray Dataset; actors each hold one tapped onnxruntime session and
turn groups of samples into Gram matrices, which an aggregation sums per class. No
activation reaches the driver.

Each class's samples are ordered by their `path` (or `id`) column and cut into chunks of
`batch_size` in that order, so a chunk is the batch a single-process `collect` runs. Patch
sampling is seeded per class over that order, so the statistics are the same whatever the
number of workers, and with every patch (`max_patches=0`) the same as `collect`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import ray
import ray.data
from ray.data.aggregate import AggregateFnV2, Sum
from ray.data.block import BlockAccessor

from .errors import InputError
from .gram import StatisticsCollector, statistic_layers
from .gram_file import ClassStatistics
from .opened import OpenedModel
from .options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_MODEL_BYTES,
    DEFAULT_MAX_PATCHES,
    DEFAULT_MAX_SAMPLE_BYTES,
    DEFAULT_SEED,
    ForgetOptions,
    Preprocessing,
)
from .runtime import quiet_onnxruntime
from .samples import SampleSet, image_format
from .selection import choose_from_class, wanted_classes

LABEL, PATH, ARRAY, ID = "label", "path", "x", "id"  # the dataset's columns
ORDINAL, CHUNK = "ordinal", "chunk"  # a sample's place in its class, and its batch there
DEFAULT_WORKERS = 2
LOCAL = "local"  # the address that starts a Ray instance on this machine


def collect(
    dataset: ray.data.Dataset,
    model,
    *,
    classes: Iterable[int] | None = None,
    per_class: int | None = None,
    workers: int = DEFAULT_WORKERS,
    max_patches: int = DEFAULT_MAX_PATCHES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    device: str = "auto",
    output_name: str | None = None,
    preprocessing: Preprocessing = Preprocessing(),
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> ClassStatistics:
    """Per-class Gram matrices of `model` over `dataset`: rows with a `label` and either a
    `path` (an image or `.npy` file every worker can read) or an array `x` with an `id`.
    `workers` actors run at once; the result is what `onnx_forget.collect` gives."""
    settings = ForgetOptions.among(locals())
    return collect_opened(dataset, OpenedModel.of(model, settings), classes, per_class, workers)


def collect_opened(dataset, opened: OpenedModel, classes, per_class, workers) -> ClassStatistics:
    """`collect` for a model already opened with its options."""
    from .api import class_statistics  # the statistics file as `collect` makes it

    batch_size, seed = opened.settings.batch_size, opened.settings.seed
    key = _order_column(dataset)
    order = _class_order(dataset, key, classes, per_class, seed)
    model_bytes = ray.put(opened.loaded.proto.SerializeToString())
    chunked = dataset.map_batches(
        _place, fn_kwargs={"order": order, "key": key, "batch_size": batch_size}
    )
    sizes = {label: len(keys) for label, keys in order.items()}
    statistics = len(statistic_layers(opened.scan.layers))
    grams = chunked.groupby([LABEL, CHUNK]).map_groups(
        _ChunkGrams,
        fn_constructor_kwargs={
            "model_bytes": model_bytes,
            "settings": opened.settings,
            "sizes": sizes,
        },
        # One actor first: the grouping shuffle needs a CPU too.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
        batch_format="numpy",
    )
    summed = grams.groupby(LABEL).aggregate(
        *(_ArraySum(f"gram_{number}") for number in range(statistics)),
        *(Sum(f"vectors_{number}", alias_name=f"vectors_{number}") for number in range(statistics)),
    )
    by_class = {int(row[LABEL]): row for row in summed.take_all()}
    return class_statistics(
        opened,
        {
            (number, label): np.asarray(by_class[label][f"gram_{number}"], dtype=np.float64)
            for number in range(statistics)
            for label in sizes
        },
        {
            (number, label): int(by_class[label][f"vectors_{number}"])
            for number in range(statistics)
            for label in sizes
        },
        sizes,
    )


def collect_folder(
    opened: OpenedModel, samples: SampleSet, address: str, workers, classes, per_class
) -> ClassStatistics:
    """The command line's `collect --ray`: a folder's sample files on the Ray cluster at
    `address` (`local`: one started here for this run)."""
    dataset = _files_dataset(samples)
    if not ray.is_initialized():
        ray.init(address=None if address == LOCAL else address, log_to_driver=False)
    return collect_opened(dataset, opened, classes, per_class, workers)


def folder_dataset(
    folder: str | Path, model, *, class_names=None, max_sample_bytes=DEFAULT_MAX_SAMPLE_BYTES
) -> ray.data.Dataset:
    """A class-per-folder tree of sample files for `model`, as a Dataset of `path` and
    `label` rows (labels through `class_names` as in a run)."""
    settings = ForgetOptions(class_names=class_names, max_sample_bytes=max_sample_bytes)
    return _files_dataset(OpenedModel.of(model, settings).samples(folder))


def _files_dataset(samples: SampleSet) -> ray.data.Dataset:
    if samples.files is None:
        raise InputError(f"{samples.origin}: Ray takes a folder of sample files here")
    rows = [{PATH: str(p), LABEL: int(c)} for p, c in zip(samples.files, samples.labels)]
    return ray.data.from_items(rows)


def _order_column(dataset: ray.data.Dataset) -> str:
    columns = dataset.columns()
    if LABEL not in columns or not ({PATH, ARRAY} & set(columns)):
        raise InputError("the dataset needs a label column and a path or x column")
    if PATH in columns:
        return PATH
    if ID not in columns:
        raise InputError("a dataset of arrays x needs an id column to order each class by")
    return ID


def _class_order(dataset, key: str, classes, per_class, seed) -> dict[int, np.ndarray]:
    """Each wanted class's sample keys in the order chunks and patch sampling follow:
    sorted, then cut to `per_class` by the seeded choice `collect` makes."""
    table = dataset.select_columns([LABEL, key]).to_pandas()
    labels, keys = table[LABEL].to_numpy(np.int64), table[key].to_numpy()
    order = {}
    for label in wanted_classes(labels, classes, "the Ray dataset"):
        members = np.sort(keys[labels == label])
        cap = per_class if per_class is not None else len(members)
        order[label] = members[choose_from_class(np.full(len(members), label), label, cap, seed)]
    return order


def _place(batch: dict, order: dict, key: str, batch_size: int) -> dict:
    """The rows taken, each with its ordinal in its class and the chunk it belongs to."""
    ordinals = np.full(len(batch[LABEL]), -1, dtype=np.int64)
    for label in np.unique(batch[LABEL]):
        keys = order.get(int(label))
        if keys is None:
            continue
        rows = np.flatnonzero(batch[LABEL] == label)
        found = np.searchsorted(keys, batch[key][rows])
        found = np.minimum(found, len(keys) - 1)
        hit = keys[found] == batch[key][rows]
        ordinals[rows[hit]] = found[hit]
    taken = ordinals >= 0
    return {
        **{column: values[taken] for column, values in batch.items()},
        ORDINAL: ordinals[taken],
        CHUNK: ordinals[taken] // batch_size,
    }


class _ChunkGrams:
    """An actor: one tapped session; a chunk of one class in, its Gram matrices out."""

    def __init__(self, model_bytes, settings: ForgetOptions, sizes: dict[int, int]):
        quiet_onnxruntime()  # the actor's process is ours: its errors reach us as exceptions
        model = onnx.load_from_string(ray.get(model_bytes))
        self.opened = OpenedModel.of(model, settings)
        self.runner = self.opened.tapped_runner()
        self.outputs = [o.name for o in self.runner.session.get_outputs()]
        self.sizes = sizes

    def __call__(self, chunk: dict) -> dict:
        order = np.argsort(chunk[ORDINAL])
        label, ordinals = int(chunk[LABEL][0]), chunk[ORDINAL][order]
        settings = self.opened.settings
        collector = StatisticsCollector(
            self.opened.scan.layers,
            {"class": np.full(self.sizes[label], label)},
            settings.max_patches,
            settings.seed,
            self.runner.gram_update,
        )
        samples = self._samples(chunk, order)
        done = int(ordinals[0])
        for batch, values in self.runner.run(samples.load, np.arange(len(order)), self.outputs):
            collector.add("class", dict(zip(self.outputs, values)), done)
            done += len(batch)
        row = {LABEL: np.array([label])}
        for number, per_set in enumerate(collector.accumulators.values()):
            row[f"gram_{number}"] = per_set["class"].gram[None]
            row[f"vectors_{number}"] = np.array([per_set["class"].vectors])
        return row

    def _samples(self, chunk: dict, order: np.ndarray) -> SampleSet:
        """The chunk's samples in ordinal order, loaded as `collect` loads them."""
        signature, settings = self.opened.signature, self.opened.settings
        common = {
            "labels": chunk[LABEL][order].astype(np.int64),
            "origin": "ray dataset",
            "shape": signature.input_shape[1:],
            "dtype": signature.input_dtype,
        }
        if PATH in chunk:
            return SampleSet(
                files=[Path(p) for p in chunk[PATH][order]],
                image_format=image_format(signature, settings.preprocessing),
                max_file_bytes=settings.max_sample_bytes,
                **common,
            )
        return SampleSet(arrays=np.stack(chunk[ARRAY][order]), **common)


class _ArraySum(AggregateFnV2):
    """The sum of an array column (a Gram matrix per row), in float64."""

    def __init__(self, column: str):
        super().__init__(column, zero_factory=lambda: 0.0, on=column, ignore_nulls=False)

    def aggregate_block(self, block):
        values = BlockAccessor.for_block(block).to_numpy(self.get_target_column())
        return np.sum(np.asarray(list(values), dtype=np.float64), axis=0)

    def combine(self, current, new):
        return current + new
