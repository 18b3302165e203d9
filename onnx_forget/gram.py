"""Streaming Gram matrices of each layer's input vectors: memory O(d^2) whatever N is."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import UnsupportedModelError
from .integer_layers import dequantized
from .layer_scan import ConvGeometry, Layer

# `rows[g]^T rows[g]` for float32 rows `[groups, n, d]`, as float32 `[groups, d, d]`.
GramProducts = Callable[[np.ndarray], np.ndarray]


def numpy_gram(rows: np.ndarray) -> np.ndarray:
    """`rows[g]^T rows[g]` in the rows' own precision.

    Float32 products summed in float64 by the caller are twice as fast as float64 ones,
    and the Gram matrix still agrees with a float64 one to about 3e-7 relative, the
    projected weights to about 1e-9.
    """
    if len(rows) == 1:  # numpy computes a 2-D `A^T A` as one symmetric update (syrk)
        return (rows[0].T @ rows[0])[None]
    return rows.transpose(0, 2, 1) @ rows


class GramAccumulator:
    """Sum of `x x^T` over one sample set's input vectors of one statistic, per group.

    Fully connected inputs contribute every row (leading dims flattened). Conv inputs
    contribute im2col patches: with a budget, each class of the set gets `budget`
    positions drawn uniformly without replacement from all its (sample, output position)
    pairs, seeded by `(seed, statistic number, class)`. Drawing per class makes a set's
    Gram matrix the sum of its classes' ones, whichever way the samples were grouped.
    """

    def __init__(
        self,
        layer: Layer,
        labels: np.ndarray,
        budget: int,
        seed: tuple[int, int],
        products: GramProducts | None = None,
    ):
        self.products = products or numpy_gram  # for float32 rows: the GPU's, or numpy's
        self.geometry = layer.geometry
        self.dequantization = layer.input_dequantization
        self.groups = layer.groups
        self.input_size = layer.input_size
        self.labels = labels  # [n] class of each sample of the set, in run order
        self.ordinals = _ordinals(labels)  # [n] position of each sample within its class
        self.class_sizes = dict(zip(*np.unique(labels, return_counts=True)))
        self.budget = budget
        self.seed = seed
        self.gram = np.zeros((self.groups, self.input_size, self.input_size), dtype=np.float64)
        self.vectors = 0
        self._chosen: dict[int, np.ndarray] = {}  # class -> sorted flat (sample, position)

    def add(
        self, values: np.ndarray, first_sample: int, tapped: dict[str, np.ndarray] | None = None
    ) -> None:
        """Add a batch of the tapped tensor holding samples `first_sample, ...` of the set
        (`tapped`: the batch's other tensors, a run-time quantization's scale among them)."""
        values = dequantized(values, self.dequantization, tapped)  # what an integer layer sees
        if self.geometry is None:
            rows = values.reshape(-1, self.input_size)[:, None, :]
        else:
            rows = self._patches(values, first_sample)
        # The batch's products in float32 at least (float16 activations are widened),
        # summed in float64.
        rows = rows.astype(np.result_type(rows.dtype, np.float32), copy=False)
        by_group = rows.transpose(1, 0, 2)  # [groups, n, d]
        products = self.products if rows.dtype == np.float32 else numpy_gram
        self.gram += products(by_group)
        self.vectors += rows.shape[0]

    def _patches(self, values: np.ndarray, first_sample: int) -> np.ndarray:
        """Patches `[n, groups, d]` of this batch: all of them, or the sampled ones."""
        windows = conv_windows(values, self.geometry)  # [n, C, *out, *kernel]
        spatial = len(self.geometry.kernel)
        out_shape = windows.shape[2 : 2 + spatial]
        positions = math.prod(out_shape)
        if self.budget == 0:
            order = (0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial))
            return windows.transpose(order).reshape(-1, self.groups, self.input_size)
        batch = slice(first_sample, first_sample + len(values))
        labels, ordinals = self.labels[batch], self.ordinals[batch]
        samples, coords = [], []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)  # batch rows of this class
            chosen = self._chosen_for(int(label), positions)
            first = ordinals[members[0]] * positions
            start, stop = np.searchsorted(chosen, [first, first + len(members) * positions])
            member, position = np.divmod(chosen[start:stop] - first, positions)
            samples.append(members[member])
            coords.append(position)
        position = np.concatenate(coords)
        picked = windows[
            (np.concatenate(samples), slice(None), *np.unravel_index(position, out_shape))
        ]
        return picked.reshape(len(position), self.groups, self.input_size)

    def _chosen_for(self, label: int, positions: int) -> np.ndarray:
        """The class's sampled flat indices, drawn once the positions per sample are known."""
        if label not in self._chosen:
            total = int(self.class_sizes[label]) * positions
            if self.budget >= total:
                self._chosen[label] = np.arange(total)
            else:
                rng = np.random.default_rng([*self.seed, label])
                self._chosen[label] = np.sort(rng.choice(total, size=self.budget, replace=False))
        return self._chosen[label]


def _ordinals(labels: np.ndarray) -> np.ndarray:
    """For each sample, how many samples of its class come before it."""
    ordinals = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = labels == label
        ordinals[members] = np.arange(np.count_nonzero(members))
    return ordinals


def conv_windows(values: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """A view `[N, C, *out, *kernel]` of every receptive field of a conv's input.

    Follows ONNX Conv: explicit `pads` or `auto_pad`, then strides on the output grid and
    dilations inside the kernel. Padding is zeros, as the convolution sees it.
    """
    spatial = len(geometry.kernel)
    sizes = values.shape[2:]
    reach = [d * (k - 1) + 1 for k, d in zip(geometry.kernel, geometry.dilations)]
    pads = conv_pads(sizes, reach, geometry)
    padded = np.pad(values, [(0, 0), (0, 0), *zip(pads[:spatial], pads[spatial:])])
    axes = tuple(range(2, 2 + spatial))
    windows = sliding_window_view(padded, reach, axis=axes)
    strided = (slice(None), slice(None), *tuple(slice(None, None, s) for s in geometry.strides))
    dilated = tuple(slice(None, None, d) for d in geometry.dilations)
    return windows[strided + dilated]


def conv_pads(sizes, reach, geometry: ConvGeometry) -> tuple[int, ...]:
    """Pads (begins then ends) after resolving `auto_pad` against the input size."""
    if geometry.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, extent, stride in zip(sizes, reach, geometry.strides):
            out = -(-size // stride)
            total = max(0, (out - 1) * stride + extent - size)
            small, large = total // 2, total - total // 2
            upper = geometry.auto_pad == "SAME_UPPER"
            begins.append(small if upper else large)
            ends.append(large if upper else small)
        return tuple(begins + ends)
    if geometry.auto_pad == "VALID":
        return (0,) * (2 * len(sizes))
    return geometry.pads


class StatisticsCollector:
    """One accumulator per (statistic, sample set); layers sharing an input share one."""

    def __init__(
        self,
        layers: tuple[Layer, ...],
        set_labels: dict[str, np.ndarray],
        max_patches: int,
        seed: int,
        products: GramProducts | None = None,
    ):
        self.accumulators: dict[tuple, dict[str, GramAccumulator]] = {}
        for number, layer in enumerate(statistic_layers(layers)):
            self.accumulators[layer.statistic_key] = {
                name: GramAccumulator(layer, labels, max_patches, (seed, number), products)
                for name, labels in set_labels.items()
            }

    def add(self, sample_set: str, tapped: dict[str, np.ndarray], first_sample: int) -> None:
        for key, per_set in self.accumulators.items():
            values = tapped[key[0]]
            if not np.isfinite(values).all():  # no subspace of NaN or Inf means anything
                raise UnsupportedModelError(
                    f"layer input {key[0]!r} holds NaN or Inf on these samples; "
                    "check the model's weights"
                )
            per_set[sample_set].add(values, first_sample, tapped)

    def gram(self, key: tuple, sample_set: str) -> np.ndarray:
        return self.accumulators[key][sample_set].gram


def statistic_layers(layers: tuple[Layer, ...]) -> list[Layer]:
    """The first layer of each statistic, in graph order: statistic `i` of a file."""
    first = {}
    for layer in layers:
        first.setdefault(layer.statistic_key, layer)
    return list(first.values())
