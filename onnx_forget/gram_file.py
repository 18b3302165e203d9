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
from typing import BinaryIO

import numpy as np

from .errors import InputError
from .layer_scan import Layer
from .outputs import write_file_atomically

FORMAT_VERSION = 1
SIZES = ("d", "groups")  # what every statistic of the header must give as positive ints


def statistic_id(layer: Layer) -> dict:
    """What identifies a statistic across runs: the tensor read and how it is read."""
    geometry = dataclasses.asdict(layer.geometry) if layer.geometry else None
    described = {
        "input": layer.input,
        "geometry": geometry,
        "d": layer.input_size,
        "groups": layer.groups,
    }
    if layer.input_dequantization is not None:  # an integer layer's input: (scale, zero point)
        described["dequantization"] = list(layer.input_dequantization)
    return json.loads(json.dumps(described))  # as it reads back from a file: lists, not tuples


@dataclass
class ClassStatistics:
    """Gram matrices per statistic and class, with what shaped them."""

    model_sha256: str
    statistics: list[dict]  # statistic_id of each statistic, in order
    options: dict  # max_patches, seed, preprocessing: runs must agree on them to combine
    samples: dict[int, int]  # samples per class
    grams: dict[tuple[int, int], np.ndarray]  # (statistic, class) -> [groups, d, d] float64
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
        write_file_atomically(Path(path), self.write)

    def write(self, stream: BinaryIO) -> None:
        """The `.npz` bytes, into an open binary file."""
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
        np.savez(stream, **arrays)


def load_statistics(path: str | os.PathLike) -> ClassStatistics:
    """Read a statistics file without unpickling anything; any malformed part is an
    InputError naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            header = _header(json.loads(str(archive["header"])), path)
            samples = {int(c): int(n) for c, n in header["samples"].items()}
            keys = [(i, c) for i in range(len(header["statistics"])) for c in samples]
            grams = {
                (i, c): _symmetric(archive[f"gram_{i}_{c}"], header["statistics"][i])
                for i, c in keys
            }
            vectors = {(i, c): int(archive[f"vectors_{i}_{c}"]) for i, c in keys}
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: not a readable statistics file ({error})") from None
    return ClassStatistics(
        header["model_sha256"], header["statistics"], header["options"], samples, grams, vectors
    )


def _header(header, path: Path) -> dict:
    """The header, once every field has the type `save` writes."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    if header.get("format") != FORMAT_VERSION:
        raise InputError(
            f"{path}: statistics format {header.get('format')!r}, this version reads "
            f"{FORMAT_VERSION}; collect them again"
        )
    expected = {"model_sha256": str, "statistics": list, "options": dict, "samples": dict}
    for key, kind in expected.items():
        if not isinstance(header.get(key), kind):
            raise ValueError(f"header field {key!r} is missing or not a {kind.__name__}")
    for statistic in header["statistics"]:
        sizes = [statistic.get(key) if isinstance(statistic, dict) else None for key in SIZES]
        if not all(isinstance(size, int) and size > 0 for size in sizes):
            raise ValueError("a statistic lacks a positive 'd' or 'groups'")
    for label, count in header["samples"].items():
        if not (label.isdigit() and isinstance(count, int) and count >= 0):
            raise ValueError("'samples' must map class indices to counts")
    return header


def merge_statistics(parts: list[ClassStatistics], origins: list[str]) -> ClassStatistics:
    """Add statistics collected on separate shards of the samples of one model."""
    first = parts[0]
    for part, origin in zip(parts[1:], origins[1:]):
        for field in ("model_sha256", "statistics", "options"):
            if getattr(part, field) != getattr(first, field):
                if field == "options":  # name the option: a default may have changed
                    what = _option_difference(part.options, first.options, origins[0])
                else:
                    what = f"{field.replace('_', ' ')} differs from {origins[0]}'s"
                raise InputError(
                    f"{origin}: {what}; only statistics of the same model collected with "
                    "the same options add up"
                )
    merged = ClassStatistics(first.model_sha256, first.statistics, first.options, {}, {}, {})
    for part in parts:
        for label, count in part.samples.items():
            merged.samples[label] = merged.samples.get(label, 0) + count
        for key, gram in part.grams.items():
            merged.grams[key] = merged.grams[key] + gram if key in merged.grams else gram.copy()
            merged.vectors[key] = merged.vectors.get(key, 0) + part.vectors[key]
    return merged


def _option_difference(options: dict, first: dict, first_origin: str) -> str:
    """The first option (by name) two unequal option sets give differently."""
    absent = object()

    def shown(value) -> str:
        return "absent" if value is absent else repr(value)

    differing = sorted(
        n for n in {*options, *first} if options.get(n, absent) != first.get(n, absent)
    )
    name = differing[0]
    return (
        f"options differ: {name} is {shown(options.get(name, absent))}, "
        f"{shown(first.get(name, absent))} in {first_origin}"
    )


def _upper_triangle(grams: np.ndarray) -> np.ndarray:
    """`[groups, d, d]` symmetric matrices as `[groups, d (d + 1) / 2]`."""
    rows, columns = np.triu_indices(grams.shape[-1])
    return grams[:, rows, columns]


def _symmetric(packed: np.ndarray, statistic: dict) -> np.ndarray:
    """Undo `_upper_triangle` for a statistic of `groups` matrices `[d, d]`."""
    groups, d = statistic["groups"], statistic["d"]
    if packed.shape != (groups, d * (d + 1) // 2):
        raise ValueError(f"an array of shape {list(packed.shape)} where {groups} x {d} x {d} go")
    rows, columns = np.triu_indices(d)
    grams = np.zeros((groups, d, d), dtype=np.float64)
    grams[:, rows, columns] = packed
    grams[:, columns, rows] = packed
    return grams
