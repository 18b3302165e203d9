"""Per-class statistics as a file: collect once, forget many times, merge shards.

The file is a plain `.npz` (never pickled): a JSON header in `header`, and for every
statistic `i` and class `c` the arrays `gram_i_c` (`[groups, d (d + 1) / 2]`, float64:
the upper triangle of each symmetric `[d, d]` Gram matrix, row by row) and `vectors_i_c`
(how many input vectors or patches were summed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .layers import Layer
from .modelio import write_bytes_atomically

FORMAT_VERSION = 1


def statistic_id(layer: Layer) -> dict:
    """What identifies a statistic across runs: the tensor read and how it is read."""
    geometry = dataclasses.asdict(layer.geometry) if layer.geometry else None
    described = {"input": layer.input, "geometry": geometry, "d": layer.d, "groups": layer.groups}
    return json.loads(json.dumps(described))  # as it reads back from a file: lists, not tuples


@dataclass
class ClassStatistics:
    """Gram matrices per statistic and class, with what shaped them."""

    model_sha256: str
    statistics: list[dict]  # statistic_id of each statistic, in order
    options: dict  # max_patches, seed, preprocessing: runs must agree on them to combine
    samples: dict[int, int]  # samples per class
    grams: dict[tuple[int, int], np.ndarray]  # (statistic, class) -> [groups, d, d]
    vectors: dict[tuple[int, int], int]

    @property
    def classes(self) -> list[int]:
        return sorted(self.samples)

    def summed(self, statistic: int, classes: list[int]) -> np.ndarray:
        """The Gram matrix of a set made of `classes`: the sum of theirs."""
        return sum(self.grams[statistic, c] for c in classes)

    def summary(self, path: str) -> dict:
        """What the file holds, for people and pipelines."""
        return {
            "path": path,
            "format": FORMAT_VERSION,
            "model_sha256": self.model_sha256,
            "statistics": len(self.statistics),
            "samples": {str(c): n for c, n in sorted(self.samples.items())},
            "options": self.options,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the `.npz` through a temporary file and a rename."""
        header = {
            "format": FORMAT_VERSION,
            "model_sha256": self.model_sha256,
            "statistics": self.statistics,
            "options": self.options,
            "samples": {str(c): n for c, n in self.samples.items()},
        }
        arrays = {"header": np.array(json.dumps(header))}
        for (statistic, label), gram in self.grams.items():
            arrays[f"gram_{statistic}_{label}"] = _upper_triangle(gram)
            arrays[f"vectors_{statistic}_{label}"] = np.array(self.vectors[statistic, label])
        write_bytes_atomically(Path(path), lambda stream: np.savez(stream, **arrays))


def load_statistics(path: str | os.PathLike) -> ClassStatistics:
    """Read a statistics file without unpickling anything."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            header = json.loads(str(archive["header"]))
            if header.get("format") != FORMAT_VERSION:
                raise InputError(
                    f"{path}: statistics format {header.get('format')!r}, this version reads "
                    f"{FORMAT_VERSION}; collect them again"
                )
            samples = {int(c): int(n) for c, n in header["samples"].items()}
            keys = [(i, c) for i in range(len(header["statistics"])) for c in samples]
            grams = {
                (i, c): _symmetric(archive[f"gram_{i}_{c}"], header["statistics"][i]["d"])
                for i, c in keys
            }
            vectors = {(i, c): int(archive[f"vectors_{i}_{c}"]) for i, c in keys}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable statistics file ({error})") from None
    return ClassStatistics(
        header["model_sha256"], header["statistics"], header["options"], samples, grams, vectors
    )


def merge_statistics(parts: list[ClassStatistics], origins: list[str]) -> ClassStatistics:
    """Add statistics collected on separate shards of the samples of one model."""
    first = parts[0]
    for part, origin in zip(parts[1:], origins[1:]):
        for field in ("model_sha256", "statistics", "options"):
            if getattr(part, field) != getattr(first, field):
                raise InputError(
                    f"{origin}: {field.replace('_', ' ')} differs from {origins[0]}'s; "
                    "only statistics of the same model collected with the same options add up"
                )
    merged = ClassStatistics(first.model_sha256, first.statistics, first.options, {}, {}, {})
    for part in parts:
        for label, count in part.samples.items():
            merged.samples[label] = merged.samples.get(label, 0) + count
        for key, gram in part.grams.items():
            merged.grams[key] = merged.grams[key] + gram if key in merged.grams else gram.copy()
            merged.vectors[key] = merged.vectors.get(key, 0) + part.vectors[key]
    return merged


def _upper_triangle(grams: np.ndarray) -> np.ndarray:
    """`[groups, d, d]` symmetric matrices as `[groups, d (d + 1) / 2]`."""
    rows, columns = np.triu_indices(grams.shape[-1])
    return grams[:, rows, columns]


def _symmetric(packed: np.ndarray, d: int) -> np.ndarray:
    """Undo `_upper_triangle`."""
    rows, columns = np.triu_indices(d)
    grams = np.zeros((packed.shape[0], d, d), dtype=np.float64)
    grams[:, rows, columns] = packed
    grams[:, columns, rows] = packed
    return grams
