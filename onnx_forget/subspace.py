"""From Gram matrices to projections: the subspace algebra of ALGORITHM.md."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


@dataclass(frozen=True)
class Decomposition:
    """Eigenvectors `[d, d]` and normalised energies `[d]` of one Gram matrix.

    For activations `A` (`[d, N]`, one input vector a column) with SVD `A = U S V^T`,
    the Gram matrix `G = A A^T = U S^2 U^T`: its eigenvectors are `U` and its eigenvalues
    `S^2`, so the energies `s_i = S_i^2 / sum_j S_j^2` need only `G`, never `A`.
    """

    vectors: np.ndarray
    energies: np.ndarray


@dataclass(frozen=True)
class SpacePair:
    """Retain and forget decompositions of one statistic, one pair per group."""

    retain: tuple[Decomposition, ...]
    forget: tuple[Decomposition, ...]

    @classmethod
    def of(cls, retain_grams: np.ndarray, forget_grams: np.ndarray) -> SpacePair:
        """Decompose `[groups, d, d]` retain and forget Gram matrices."""
        return cls(
            tuple(decompose(g) for g in retain_grams), tuple(decompose(g) for g in forget_grams)
        )

    def projections(self, alpha_r: float, alpha_f: float) -> np.ndarray:
        """One `P` per group, `[groups, d, d]`; only this step depends on the alphas."""
        return np.stack(
            [projection(r, f, alpha_r, alpha_f) for r, f in zip(self.retain, self.forget)]
        )


def decompose(gram: np.ndarray) -> Decomposition:
    """Eigen-decomposition of a symmetric `[d, d]` Gram matrix in float64."""
    eigenvalues, eigenvectors = scipy.linalg.eigh(gram)
    eigenvalues = np.clip(eigenvalues, 0.0, None)  # rounding can leave tiny negatives
    total = eigenvalues.sum()
    energies = eigenvalues / total if total > 0 else np.zeros_like(eigenvalues)
    return Decomposition(eigenvectors, energies)


def scaled_importances(energies: np.ndarray, alpha: float) -> np.ndarray:
    """`lambda_i = alpha s_i / ((alpha - 1) s_i + 1)`: alpha = 1 keeps `s_i`."""
    return alpha * energies / ((alpha - 1.0) * energies + 1.0)


def importance_matrix(decomposition: Decomposition, alpha: float) -> np.ndarray:
    """`M = U diag(lambda) U^T`, `[d, d]`."""
    vectors = decomposition.vectors
    return (vectors * scaled_importances(decomposition.energies, alpha)) @ vectors.T


def projection(
    retain: Decomposition, forget: Decomposition, alpha_r: float, alpha_f: float
) -> np.ndarray:
    """`P = I - (M_f - M_f M_r)`, `[d, d]`: remove the forget space the retain space lacks."""
    m_retain = importance_matrix(retain, alpha_r)
    m_forget = importance_matrix(forget, alpha_f)
    return np.eye(len(m_forget)) - (m_forget - m_forget @ m_retain)
