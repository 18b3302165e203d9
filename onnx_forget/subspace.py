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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import scipy.linalg

# Applies `P` to column blocks: `[groups, d, k]` -> `[groups, d, k]`.
Projection = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SpacePair:
    """Retain and forget Gram matrices `[groups, d, d]` of one statistic, read from their
    lower triangles: float64, or float32 where a set was summed in float32 (each meets
    float64 as it is factored). Their rows are the weight's `(channel, *kernel)` inputs,
    or with `kernel_major` taps, those inputs read `(*kernel, channel)`."""

    retain: np.ndarray
    forget: np.ndarray
    kernel_major: int = 1

    def projection(self, alpha_r: float, alpha_f: float) -> Projection:
        """`P = I - M_f (I - M_r)` per group, as factors: forming `P` is never needed."""
        factors = [
            (_Importance(retain, alpha_r), _Importance(forget, alpha_f))
            for retain, forget in zip(self.retain, self.forget)
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
            energies = np.divide(gram, trace, dtype=np.float64)  # (1 / trace may overflow)
            if abs(alpha - 1.0) < NEAR_ONE:  # symmetric, from the lower triangle
                self.gram = np.tril(energies) + np.tril(energies, -1).T
            # X / T = (alpha - 1) G / T + I, symmetric positive definite.
            shifted = energies
            shifted *= alpha - 1.0
            shifted.flat[:: len(gram) + 1] += 1.0
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
