"""Streaming Gram matrices of each layer's input vectors: memory O(d^2) whatever N is."""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .errors import UnsupportedModelError
from .integer_layers import dequantized
from .layer_scan import ConvGeometry, Layer

# A set small enough for one float32 run (at most FLOAT32_RUN_VECTORS vectors over at most
# FLOAT32_RUN_BATCHES batches, judged at its first batch) sums its products in the rows'
# precision (float32 for float32 or float16 activations) in a buffer of its own, and is
# read in that precision: it meets float64 only where the decomposition divides it by its
# trace, a pass it makes anyway (a float64 copy at read time cost as much as a batch's
# product at d = 4608, most of it faulting in fresh pages). Each entry sums at most 16
# batch products in float32 on top of the products' own sums, so the Gram matrix agrees
# with a float64 one to about 2e-6 relative at any batch size. A larger set adds each
# batch's product into a float64 total from its first batch on: made in float32 and added,
# or for a batch of fewer than FLOAT64_PRODUCT_BELOW vectors made in float64 straight into
# the total, which is then cheaper than zeroing a float32 product and adding it (ViT-B/16
# at its memory-bound batch of one sample, 197 tokens: 20 s of its collection).
FLOAT32_RUN_VECTORS = 16_384
FLOAT32_RUN_BATCHES = 16
FLOAT64_PRODUCT_BELOW = 256

SMALL_PAGES_FROM = 4 << 20  # bytes: where numpy starts asking for 2 MB pages
TRIANGLE_BLOCK = 256  # rows per step over a lower triangle (a mirrored block stays cached)

# Adds `rows[g]^T rows[g]` of rows `[groups, n, d]` into the lower triangle (C order) of
# `sums[g]` (`[groups, d, d]`, the rows' dtype); the upper triangle may be left as it was.
GramUpdate = Callable[[np.ndarray, np.ndarray], None]


def numpy_gram_update(rows: np.ndarray, sums: np.ndarray) -> None:
    """Add `rows[g]^T rows[g]` into `sums[g]`'s lower triangle, by BLAS on the host."""
    if len(rows) == 1:
        # One symmetric rank-n update straight into the sum: half a product's
        # flops, and no d x d product to allocate and add. The C-ordered sum is the
        # Fortran-ordered transpose BLAS updates in place, its upper triangle our lower.
        syrk = scipy.linalg.blas.get_blas_funcs("syrk", (rows,))
        updated = syrk(1.0, rows[0].T, beta=1.0, c=sums[0].T, lower=0, overwrite_c=True)
        if not np.shares_memory(updated, sums):  # a sum BLAS could not update in place
            sums[0] = updated.T
    else:
        sums += rows.transpose(0, 2, 1) @ rows


@dataclass(frozen=True)
class Vectors:
    """A one-group set's input vectors `[n, d]` themselves, kept instead of their Gram
    matrix where `2 n <= d`: its `d x d` Gram matrix has rank at most `n`, and the
    decomposition can work with the `n x n` products of the vectors instead (see
    `subspace`), at a fraction of the memory and flops."""

    rows: np.ndarray


def keeps_vectors(groups: int, size: int, vectors: int) -> bool:
    """Whether a set of `vectors` input vectors of `size` is kept as its `Vectors`."""
    return groups == 1 and 2 * vectors <= size


class GramAccumulator:
    """Sum of `x x^T` over one sample set's input vectors of one statistic, per group.

    Fully connected inputs contribute every row (leading dims flattened). Conv inputs
    contribute im2col patches: with a budget, each class of the set gets `budget`
    positions drawn uniformly without replacement from all its (sample, output position)
    pairs, seeded by `(seed, statistic number, class)`. Drawing per class makes a set's
    Gram matrix the sum of its classes' ones, whichever way the samples were grouped.

    A one-group set of at most `d / 2` vectors keeps the vectors themselves (`Vectors`).
    Any other set that fits one float32 run (see FLOAT32_RUN_VECTORS) sums in a buffer of
    the rows' precision; a larger one adds each batch's product, made in `scratch` (one
    buffer shared by a collector's accumulators), into a float64 total. Either way a set
    holds at most one `d x d` sum (4 or 8 bytes an entry; rows in the order
    `kernel_major` says), however many samples it sees.
    """

    def __init__(
        self,
        layer: Layer,
        labels: np.ndarray,
        budget: int,
        seed: tuple[int, int],
        update: GramUpdate | None = None,
        scratch: Scratch | None = None,
    ):
        self.update = update or numpy_gram_update  # for float32 rows: the GPU's, or numpy's
        self.scratch = scratch or Scratch()
        self.geometry = layer.geometry
        self.dequantization = layer.input_dequantization
        self.groups = layer.groups
        self.input_size = layer.input_size
        self.labels = labels  # [n] class of each sample of the set, in run order
        self.ordinals = _ordinals(labels)  # [n] position of each sample within its class
        self.class_sizes = dict(zip(*np.unique(labels, return_counts=True)))
        self.budget = budget
        self.seed = seed
        self.float32_run: np.ndarray | None = None  # lower triangles, the rows' precision
        self.total: np.ndarray | None = None  # float64, in the weight's order
        self.kept: np.ndarray | None = None  # [n, d] the set's vectors, where n <= d / 2
        self.vectors = 0
        self._chosen: dict[int, np.ndarray] = {}  # class -> sorted flat (sample, position)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.groups, self.input_size, self.input_size)

    def add(
        self, values: np.ndarray, first_sample: int, tapped: dict[str, np.ndarray] | None = None
    ) -> None:
        """Add a batch of the tapped tensor holding samples `first_sample, ...` of the set
        (`tapped`: the batch's other tensors, a run-time quantization's scale among them)."""
        values = dequantized(values, self.dequantization, tapped)  # what an integer layer sees
        if self.geometry is None:
            rows = values.reshape(-1, 1, self.input_size)
        else:
            rows = self._patches(values, first_sample)
        # The batch's products in float32 at least (float16 activations are widened).
        rows = rows.astype(np.result_type(rows.dtype, np.float32), copy=False)
        if self.total is None and self.float32_run is None and self.kept is None:
            self._begin(values.shape, rows)  # the set's first batch
        if self.kept is not None and self.vectors + len(rows) > len(self.kept):
            self._fold_kept_rows()  # more vectors than the first batch foretold
        if self.kept is not None:
            self.kept[self.vectors : self.vectors + len(rows)] = rows[:, 0]
        else:
            self._sum(rows.transpose(1, 0, 2))
        self.vectors += len(rows)

    def _begin(self, batch_shape: tuple[int, ...], rows: np.ndarray) -> None:
        """Choose how the set is kept, from its first batch (`[n, C, *sizes]` tapped, its
        `rows` `[n, groups, d]`): its vectors themselves where they will be at most half as
        many as their dimension (one group), else a float32 run or a float64 total."""
        vectors, batches = self._expected_size(batch_shape, len(rows))
        if keeps_vectors(self.groups, self.input_size, vectors):
            self.kept = np.empty((vectors, self.input_size), dtype=rows.dtype)
        elif vectors > FLOAT32_RUN_VECTORS or batches > FLOAT32_RUN_BATCHES:
            self.total = lower_triangle_zeros(self.shape, np.float64)
        else:
            self.float32_run = lower_triangle_zeros(self.shape, rows.dtype)

    def _sum(self, by_group: np.ndarray) -> None:
        """Add the products of rows `[groups, n, d]` into the set's sums."""
        update = self.update if by_group.dtype == np.float32 else numpy_gram_update
        if self.float32_run is not None:
            update(by_group, self.float32_run)
        elif by_group.shape[1] < FLOAT64_PRODUCT_BELOW:
            numpy_gram_update(by_group.astype(np.float64), self.total)
        else:
            product = self.scratch.empty("product", self.shape, by_group.dtype)
            product.fill(0)
            update(by_group, product)
            _add_lower_triangles(self.total, product)

    def _fold_kept_rows(self) -> None:
        """Sum the vectors kept so far into a float64 total, which the set goes on in."""
        kept = self.kept[: self.vectors]
        self.kept = None
        self.total = lower_triangle_zeros(self.shape, np.float64)
        self._sum(kept[None])

    def _expected_size(self, batch_shape: tuple[int, ...], batch_vectors: int):
        """The whole set's vectors and batches, judged from its first batch."""
        samples, batch_samples = len(self.labels), batch_shape[0]
        batches = math.ceil(samples / max(1, batch_samples))
        if self.geometry is None or self.budget == 0:  # every vector of every sample
            vectors = samples * batch_vectors // max(1, batch_samples)
        else:
            positions = math.prod(output_shape(batch_shape[2:], self.geometry))
            sizes = self.class_sizes.values()
            vectors = sum(min(self.budget, int(size) * positions) for size in sizes)
        return vectors, batches

    @property
    def statistic(self) -> np.ndarray | Vectors:
        """What the decomposition reads, rows and columns as `kernel_major` says: the
        set's `Vectors` where it kept them, else its Gram matrices `[groups, d, d]` in
        their lower triangles (the upper ones are not kept: a Cholesky factor reads one),
        float64 or, for a set of one float32 run, in the rows' precision (exact in
        float64)."""
        if self.kept is not None:
            return Vectors(self.kept[: self.vectors])
        if self.total is None and self.float32_run is None:  # a set with no vectors
            self.total = np.zeros(self.shape)
        return self.total if self.float32_run is None else self.float32_run

    @property
    def kernel_major(self) -> int:
        """The kernel taps by which the rows of `statistic` run first: a one-group conv's
        patches are gathered `(*kernel, channel)`, its weight's inputs are
        `(channel, *kernel)`. 1 where the rows are in the weight's order. Putting the sums
        in the weight's order would copy them; the projection reorders the weight's `d`
        rows instead."""
        if self.geometry is None or self.groups > 1:
            return 1
        return math.prod(self.geometry.kernel)

    @property
    def gram(self) -> np.ndarray:
        """The set's Gram matrices `[groups, d, d]` in float64 and in the weight's order,
        as statistics files hold them."""
        statistic = self.statistic
        if isinstance(statistic, Vectors):
            grams = np.zeros(self.shape)
            numpy_gram_update(statistic.rows[None].astype(np.float64), grams)
        else:
            grams = np.array(statistic, dtype=np.float64)
        _mirror_lower_triangle(grams)
        taps = self.kernel_major
        if taps == 1:
            return grams
        per_tap = self.input_size // taps
        by_tap = grams.reshape(self.groups, taps, per_tap, taps, per_tap)
        return by_tap.transpose(0, 2, 1, 4, 3).reshape(self.shape)

    def _patches(self, values: np.ndarray, first_sample: int) -> np.ndarray:
        """Patches `[n, groups, d]` of this batch, all or the sampled ones.

        With one group they are gathered from the input moved channels-last, as runs of
        contiguous channels, in `(*kernel, channel)` order (see `kernel_major`). A grouped
        conv's (a depthwise one's are a few taps of one channel) are gathered within each
        channel's own plane into `[channel, tap, patch]`: each group's `[d, n]` block, in
        the weight's `(channel, *kernel)` order, ready for its product.
        """
        out_shape = output_shape(values.shape[2:], self.geometry)
        positions = math.prod(out_shape)
        if self.budget == 0:
            samples = np.repeat(np.arange(len(values)), positions)
            position = np.tile(np.arange(positions), len(values))
        else:
            samples, position = self._sampled(first_sample, len(values), positions)
        corners = np.unravel_index(position, out_shape)
        grouped = self.groups > 1
        grid = _PaddedGrid(values, self.geometry, channels_last=not grouped)
        starts = samples * grid.positions
        for axis, corner in enumerate(corners):
            starts += corner * (self.geometry.strides[axis] * grid.steps[axis])
        flat = starts[:, None] + grid.kernel_offsets  # [n, k] cells of each patch's taps
        # Into a reused buffer: a fresh one per batch spent most of the gather faulting
        # in pages. Every index is in the grid, so "clip" only skips numpy's checks.
        if grouped:
            shape = (values.shape[1], flat.shape[1], len(samples))
            patches = self.scratch.empty("patches", shape, values.dtype)
            np.take(grid.cells, flat.T, axis=1, out=patches, mode="clip")
            by_group = patches.reshape(self.groups, self.input_size, len(samples))
            return by_group.transpose(2, 0, 1)
        rows = self.scratch.empty("patches", (*flat.shape, values.shape[1]), values.dtype)
        np.take(grid.cells, flat, axis=0, out=rows, mode="clip")
        return rows.reshape(len(samples), 1, self.input_size)

    def _sampled(self, first_sample: int, count: int, positions: int):
        """Batch rows and output positions of this batch's share of each class's draw."""
        batch = slice(first_sample, first_sample + count)
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
        return np.concatenate(samples), np.concatenate(coords)

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


def lower_triangle_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros for sums kept in their lower triangles only (what `syrk` writes and
    `_add_lower_triangles` adds). From SMALL_PAGES_FROM bytes on, an anonymous mapping in
    small pages, so that memory is taken only where a triangle is written: numpy asks for
    2 MB pages for arrays that large, which fault in the whole square, untouched half
    included (ResNet-18's collection: 6.5 s this way, 7.2-7.6 s with `np.zeros`). Smaller
    ones (a depthwise conv's many 9 x 9 factors) are not worth a mapping each."""
    count = math.prod(shape)
    size = count * np.dtype(dtype).itemsize
    if size < SMALL_PAGES_FROM:
        return np.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, size)  # zeroed as first written
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(pages, dtype=dtype, count=count).reshape(shape)


class Scratch:
    """Reusable buffers, one per use and dtype, for what each batch makes and drops (its
    patches, and the product of a set too large for one float32 run): their pages stay
    with the process, where fresh arrays per batch would be faulted in anew."""

    def __init__(self):
        self.buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def empty(self, use: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array for `use`; valid until the next call for `use`."""
        size = math.prod(shape)
        key = (use, np.dtype(dtype))
        buffer = self.buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = self.buffers[key] = np.empty(size, dtype=dtype)
        return buffer[:size].reshape(shape)


class _PaddedGrid:
    """A conv's input `[N, C, *sizes]` padded as the convolution sees it (zeros), as
    `cells`: `[N * positions, C]` channels-last, or `[C, N * positions]` one plane per
    channel; with where each patch's kernel taps sit relative to its corner."""

    def __init__(self, values: np.ndarray, geometry: ConvGeometry, channels_last: bool):
        spatial = len(geometry.kernel)
        sizes = values.shape[2:]
        pads = conv_pads(sizes, _reach(geometry), geometry)
        padding = list(zip(pads[:spatial], pads[spatial:]))
        if channels_last:
            padded = np.pad(np.moveaxis(values, 1, -1), [(0, 0), *padding, (0, 0)])
            padded_sizes = padded.shape[1:-1]
            self.cells = padded.reshape(-1, values.shape[1])
        else:
            padded = np.pad(values.swapaxes(0, 1), [(0, 0), (0, 0), *padding])
            padded_sizes = padded.shape[2:]
            self.cells = padded.reshape(values.shape[1], -1)
        self.positions = math.prod(padded_sizes)
        self.steps = [math.prod(padded_sizes[axis + 1 :]) for axis in range(spatial)]
        taps = np.indices(geometry.kernel).reshape(spatial, -1)  # [spatial, k], row-major
        self.kernel_offsets = sum(
            taps[axis] * (geometry.dilations[axis] * self.steps[axis]) for axis in range(spatial)
        )


def output_shape(sizes: tuple[int, ...], geometry: ConvGeometry) -> tuple[int, ...]:
    """The conv's output grid over an input grid of `sizes`."""
    reach = _reach(geometry)
    pads = conv_pads(sizes, reach, geometry)
    spatial = len(sizes)
    return tuple(
        (size + pads[axis] + pads[spatial + axis] - reach[axis]) // geometry.strides[axis] + 1
        for axis, size in enumerate(sizes)
    )


def _reach(geometry: ConvGeometry) -> list[int]:
    """The kernel's extent along each axis, dilations included."""
    return [d * (k - 1) + 1 for k, d in zip(geometry.kernel, geometry.dilations)]


def lower_triangle_blocks(size: int):
    """`(start, stop)` of each block of rows of a `size x size` matrix: the lower
    triangle lies within `[start:stop, :stop]`."""
    for start in range(0, size, TRIANGLE_BLOCK):
        yield start, min(size, start + TRIANGLE_BLOCK)


def _mirror_lower_triangle(matrices: np.ndarray) -> None:
    """Copy each matrix's lower triangle onto its upper one, in place, in blocks of rows."""
    for start, stop in lower_triangle_blocks(matrices.shape[-1]):
        matrices[:, start:stop, stop:] = matrices[:, stop:, start:stop].transpose(0, 2, 1)
        block = matrices[:, start:stop, start:stop]
        block[...] = np.tril(block) + np.tril(block, -1).transpose(0, 2, 1)


def _add_lower_triangles(total: np.ndarray, product: np.ndarray) -> None:
    """`total += product` over the lower triangles (and diagonal blocks) alone."""
    for start, stop in lower_triangle_blocks(total.shape[-1]):
        total[:, start:stop, :stop] += product[:, start:stop, :stop]


def _ordinals(labels: np.ndarray) -> np.ndarray:
    """For each sample, how many samples of its class come before it."""
    ordinals = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = labels == label
        ordinals[members] = np.arange(np.count_nonzero(members))
    return ordinals


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
        update: GramUpdate | None = None,
    ):
        self.accumulators: dict[tuple, dict[str, GramAccumulator]] = {}
        scratch = Scratch()
        for number, layer in enumerate(statistic_layers(layers)):
            self.accumulators[layer.statistic_key] = {
                name: GramAccumulator(layer, labels, max_patches, (seed, number), update, scratch)
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
