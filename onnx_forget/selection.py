"""Which samples a run takes: seeded choices per class, the same in every kind of run."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .errors import InputError


def choose_from_class(labels: np.ndarray, label: int, count: int, seed: int) -> np.ndarray:
    """Up to `count` sorted indices of class `label`, drawn by a generator of its own.

    Seeding by `(seed, label)` makes a class's choice independent of the other classes,
    so the same class and count give the same samples in every kind of run.
    """
    members = np.flatnonzero(labels == label)
    if len(members) <= count:
        return members
    rng = np.random.default_rng([seed, int(label)])
    return np.sort(rng.choice(members, size=count, replace=False))


def wanted_classes(labels: np.ndarray, classes: Iterable[int] | None, origin: str) -> list[int]:
    """The classes a collection takes: `classes`, sorted, or every one present; a wanted
    class without samples is refused."""
    present = sorted(int(c) for c in np.unique(labels))
    wanted = present if classes is None else sorted({int(c) for c in classes})
    missing = [c for c in wanted if c not in present]
    if missing:
        raise InputError(f"{origin}: no samples of class {missing[0]}")
    return wanted


def select_samples(
    labels: np.ndarray,
    forget_classes: Sequence[int],
    retain_per_class: int,
    forget_samples: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded retain indices (up to `retain_per_class` per kept class) and forget indices
    (up to `forget_samples` in all, shared evenly by the forgotten classes)."""
    forgotten = sorted(int(c) for c in np.unique(labels) if c in set(forget_classes))
    kept = [int(c) for c in np.unique(labels) if int(c) not in forgotten]
    share, extra = divmod(forget_samples, max(len(forgotten), 1))
    retain = [choose_from_class(labels, c, retain_per_class, seed) for c in kept]
    forget = [
        choose_from_class(labels, c, share + (i < extra), seed) for i, c in enumerate(forgotten)
    ]
    return _sorted_union(retain), _sorted_union(forget)


def split_validation(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of every class into fit and validation indices (`share` validation)."""
    validation = [
        choose_from_class(labels, c, round(share * np.count_nonzero(labels == c)), seed + 1)
        for c in np.unique(labels)
    ]
    validation = _sorted_union(validation)
    return np.setdiff1d(np.arange(len(labels)), validation), validation


def _sorted_union(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
