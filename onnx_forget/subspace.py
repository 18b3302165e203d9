"""From Gram matrices to projections: the subspace algebra of docs/method.md, without an
eigendecomposition.

docs/method.md writes `M = U diag(lambda) U^T` with `U`, `S^2` the eigenvectors and
eigenvalues of the Gram matrix `G = A A^T`, energies `s_i = S_i^2 / T` where
`T = trace(G)`, and `lambda_i = alpha s_i / ((alpha - 1) s_i + 1)`. That is a rational
function of `G` applied to its eigenvalues, so with

    X = (alpha - 1) G + T I

(`G`, `X` and their inverses commute), and for `alpha != 1`, where `G = (X - T I) / (alpha - 1)`:

    M     = alpha G X^{-1}           = alpha / (alpha - 1) (I - T X^{-1}),
    I - M = (T I - G) X^{-1}         = (alpha T X^{-1} - I) / (alpha - 1).

`X` is symmetric positive definite for any `alpha > 0` (its eigenvalues lie between
`min(1, alpha) T` and `max(1, alpha) T`), so a Cholesky factor replaces the
eigendecomposition: about a thirtieth of the flops, every one of them in matrix-matrix
BLAS, and condition number at most `max(alpha, 1/alpha)`. The right-hand forms need no
product with `G` at all; their rounding grows as `1 / |alpha - 1|`, so near `alpha = 1`
the left-hand forms are used. Both are computed with `X / T` and `G / T`, of scale 1.

A set kept as its `n <= d / 2` vectors `A` (`G = A^T A`, see `gram.Vectors`) is factored
through its `n x n` products instead (`_VectorImportance`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .gram import Vectors, lower_triangle_blocks, lower_triangle_zeros

# Applies `P` to column blocks: `[groups, d, k]` -> `[groups, d, k]`.
Projection = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SpacePair:
    """Retain and forget statistics of one statistic: each a set's Gram matrices
    `[groups, d, d]`, read from their lower triangles (float64, or float32 where a set was
    summed in float32: each meets float64 as it is factored), or a one-group set's
    `Vectors`. Their `d` axes are the weight's `(channel, *kernel)` inputs, or with
    `kernel_major` taps, those inputs read `(*kernel, channel)`."""

    retain: np.ndarray | Vectors
    forget: np.ndarray | Vectors
    kernel_major: int = 1

    def projection(self, alpha_r: float, alpha_f: float) -> Projection:
        """`P = I - M_f (I - M_r)` per group, as factors: forming `P` is never needed."""
        factors = [
            (_importance(retain, alpha_r), _importance(forget, alpha_f))
            for retain, forget in zip(_by_group(self.retain), _by_group(self.forget))
        ]
        taps = self.kernel_major

        def apply(columns: np.ndarray) -> np.ndarray:
            groups, size, count = columns.shape
            ordered = _swap_row_axes(columns, size // taps, taps)
            # Each block stays in the Fortran order of a weight stored `[k, d]` (a conv's
            # or Gemm's): the order LAPACK solves in, and the rows' reorder is a strided
            # copy of contiguous runs.
            projected = np.empty((groups, count, size)).transpose(0, 2, 1)
            for (m_retain, m_forget), block, result in zip(factors, ordered, projected):
                result[...] = block - m_forget.times(m_retain.complement_times(block))
            return _swap_row_axes(projected, taps, size // taps)

        return apply


def _swap_row_axes(columns: np.ndarray, outer: int, inner: int) -> np.ndarray:
    """`columns` `[groups, d, k]` with its `d` rows read as `[outer, inner]`, reordered
    to `[inner, outer]`: the same array when either is 1."""
    if outer == 1 or inner == 1:
        return columns
    groups, size, count = columns.shape
    by_row = columns.transpose(0, 2, 1).reshape(groups, count, outer, inner)
    swapped = by_row.transpose(0, 1, 3, 2).reshape(groups, count, size)
    return swapped.transpose(0, 2, 1)


def _by_group(statistic: np.ndarray | Vectors) -> list:
    """A set's statistic for each group: `Vectors` are of one group."""
    return [statistic] if isinstance(statistic, Vectors) else list(statistic)


def _importance(statistic: np.ndarray | Vectors, alpha: float):
    """`M` of one group's statistic, factored."""
    if isinstance(statistic, Vectors):
        return _VectorImportance(statistic.rows, alpha)
    return _Importance(statistic, alpha)


# Below this `|alpha - 1|`, `M` is applied through `G` (rounding of the `G`-free form
# ~ 1e-16 / |alpha - 1|, against float32 weights).
NEAR_ONE = 1e-3


class _Importance:
    """`M` of one Gram matrix, kept as the Cholesky factor of `X / T`, and `G / T` only
    where `alpha` is near 1. Dividing by the trace makes the factor's scale 1 whatever the
    activations' (a Gram matrix of tiny values would otherwise overflow `T X^{-1}`)."""

    def __init__(self, gram: np.ndarray, alpha: float):
        self.alpha = alpha
        trace = float(np.trace(gram, dtype=np.float64))
        self.gram = None
        self.factor = None  # all-zero inputs: no energy, so M = 0
        if trace > 0:
            size = len(gram)
            if abs(alpha - 1.0) < NEAR_ONE:  # symmetric, from the lower triangle
                energies = np.divide(gram, trace, dtype=np.float64)  # (1 / trace may overflow)
                self.gram = np.tril(energies) + np.tril(energies, -1).T
            # X / T = (alpha - 1) G / T + I, symmetric positive definite: its lower
            # triangle, all LAPACK reads, in memory taken only there.
            shifted = lower_triangle_zeros((size, size), np.float64)
            for start, stop in lower_triangle_blocks(size):
                block = shifted[start:stop, :stop]
                np.divide(gram[start:stop, :stop], trace, out=block, dtype=np.float64)
                block *= alpha - 1.0
            shifted.flat[:: size + 1] += 1.0
            # LAPACK factors the Fortran-ordered transpose in place (the C-ordered array
            # itself would be copied first), reading its upper triangle: our lower one.
            self.factor = scipy.linalg.cho_factor(shifted.T, overwrite_a=True, check_finite=False)

    def times(self, block: np.ndarray) -> np.ndarray:
        """`M @ block`."""
        if self.factor is None:
            return np.zeros_like(block)
        if self.gram is not None:
            return self.alpha * self._solve(self.gram @ block)
        solved = self._solve(block)
        solved -= block
        solved *= self.alpha / (1.0 - self.alpha)
        return solved

    def complement_times(self, block: np.ndarray) -> np.ndarray:
        """`(I - M) @ block`."""
        if self.factor is None:
            return block
        if self.gram is not None:
            return self._solve(block - self.gram @ block)
        solved = self._solve(block)
        solved *= self.alpha
        solved -= block
        solved /= self.alpha - 1.0
        return solved

    def _solve(self, block: np.ndarray) -> np.ndarray:
        """`(X / T)^{-1} block`."""
        return scipy.linalg.cho_solve(self.factor, block, check_finite=False)


class _VectorImportance:
    """`M` of a set kept as its vectors `A` `[n, d]`, through `n x n` factors.

    With `K = A A^T`, `G X^{-1} = A^T ((alpha - 1) K / T + I)^{-1} A / T` (the
    push-through identity), so with `A' = A / sqrt(T)` (its `K'` has trace 1):

        M = alpha A'^T Y^{-1} A',    Y = (alpha - 1) K' + I.

    `Y` is symmetric positive definite for any `alpha > 0`, with condition number at most
    `max(alpha, 1/alpha)`, and nothing divides by `alpha - 1`: one form serves every
    alpha. For `n <= d / 2` its factor is at most an eighth of the `d x d` one's flops.
    """

    def __init__(self, rows: np.ndarray, alpha: float):
        self.alpha = alpha
        self.rows = None  # no vectors, or all zero: no energy, so M = 0
        scaled = rows.astype(np.float64)
        largest = max(-scaled.min(initial=0.0), scaled.max(initial=0.0))  # no |rows| copy
        if largest > 0:
            scaled /= largest  # so that the trace can neither overflow nor underflow
            scaled /= np.sqrt(np.einsum("ij,ij->", scaled, scaled))
            # `(alpha - 1) K'` into the upper triangle of a Fortran-ordered array, which
            # LAPACK factors in place.
            syrk = scipy.linalg.blas.get_blas_funcs("syrk", (scaled,))
            shifted = syrk(alpha - 1.0, scaled.T, trans=1)
            shifted.flat[:: len(shifted) + 1] += 1.0
            self.factor = scipy.linalg.cho_factor(shifted, overwrite_a=True, check_finite=False)
            self.rows = scaled

    def times(self, block: np.ndarray) -> np.ndarray:
        """`M @ block`."""
        if self.rows is None:
            return np.zeros_like(block)
        solved = scipy.linalg.cho_solve(self.factor, self.rows @ block, check_finite=False)
        solved *= self.alpha
        return self.rows.T @ solved

    def complement_times(self, block: np.ndarray) -> np.ndarray:
        """`(I - M) @ block`."""
        return block - self.times(block)


class Projections:
    """Each statistic's projection at one (alpha_r, alpha_f), factored when asked for.

    Nothing is cached: a caller that takes one statistic at a time holds one statistic's
    factors at a time, so memory stays at the Gram matrices themselves.
    """

    def __init__(
        self,
        spaces: Mapping[tuple, SpacePair],
        alpha_r: float,
        alpha_f: float,
        timing: Callable[[], AbstractContextManager] = nullcontext,
    ):
        self.spaces, self.alpha_r, self.alpha_f, self.timing = spaces, alpha_r, alpha_f, timing

    def factor(self, key: tuple) -> Projection:
        """Factor statistic `key`'s Gram matrices (timed) and return its projection."""
        with self.timing():
            return self.spaces[key].projection(self.alpha_r, self.alpha_f)
