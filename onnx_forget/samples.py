"""Sample sets from folders, `.npz` files or arrays, decoded batch by batch on demand."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError
from .options import Preprocessing
from .signature import Signature

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ARRAY_SUFFIX = ".npy"
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass
class SampleSet:
    """Labels of every sample, and a way to load any subset of them as model inputs."""

    labels: np.ndarray  # [N] int64
    origin: str
    files: list[Path] | None = None  # folder samples, one file each
    arrays: np.ndarray | None = None  # in-memory samples [N, ...]
    skipped_files: int = 0
    shape: tuple[int | None, ...] = ()
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    image_format: ImageFormat | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: np.ndarray) -> np.ndarray:
        """Model inputs `[len(indices), ...]` in the model's dtype."""
        if self.arrays is not None:
            batch = self.arrays[indices]
        else:
            batch = np.stack([self._load_file(self.files[i]) for i in indices])
        return batch.astype(self.dtype, copy=False)

    def _load_file(self, path: Path) -> np.ndarray:
        if path.suffix.lower() == ARRAY_SUFFIX:
            try:
                array = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as error:
                raise InputError(f"{path}: not a readable .npy array ({error})") from None
        elif self.image_format is None:
            raise InputError(
                f"{path}: the model's input {_shape_text(self.shape)} is not an image of 1, 3 "
                "or 4 channels; give preprocessed .npy samples instead"
            )
        else:
            array = self.image_format.decode(path)
        return _checked(array, self.shape, path)


@dataclass(frozen=True)
class ImageFormat:
    """How an image file becomes one model input: channels, size, scaling, layout."""

    channels: int
    size: tuple[int, int] | None  # (width, height); None keeps the file's own size
    layout: str  # "nchw", "nhwc", or "flat" for inputs without a channel axis
    preprocessing: Preprocessing
    flat_shape: tuple[int, ...] | None = None

    def decode(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                image = image.convert(IMAGE_MODES[self.channels])
                if self.size is not None and image.size != self.size:
                    image = image.resize(self.size, Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise InputError(f"{path}: not a readable image ({error})") from None
        pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], self.channels)
        values = pixels * np.float32(self.preprocessing.scale)
        if self.preprocessing.mean is not None:
            values = values - np.asarray(self.preprocessing.mean, dtype=np.float32)
        if self.preprocessing.std is not None:
            values = values / np.asarray(self.preprocessing.std, dtype=np.float32)
        if self.layout == "nchw":
            return values.transpose(2, 0, 1)
        if self.layout == "flat":
            return values.reshape(self.flat_shape)
        return values


def _checked(array: np.ndarray, shape: tuple[int | None, ...], path) -> np.ndarray:
    """Refuse samples whose shape, type or values the model cannot take."""
    if array.dtype.kind not in "fiub":
        raise InputError(f"{path}: sample has dtype {array.dtype}, expected numbers")
    if len(array.shape) != len(shape) or any(
        want is not None and have != want for have, want in zip(array.shape, shape)
    ):
        raise InputError(
            f"{path}: sample shape {list(array.shape)}, model expects {_shape_text(shape)}"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{path}: sample holds NaN or Inf values")
    return array


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def open_samples(
    source: str | os.PathLike | tuple[np.ndarray, np.ndarray],
    signature: Signature,
    preprocessing: Preprocessing,
    class_names: Sequence[str] | None = None,
) -> SampleSet:
    """Open a class-per-folder tree, a `.npz` with `x` and `y`, or `(x, y)` arrays."""
    sample_shape = signature.input_shape[1:]
    if isinstance(source, tuple):
        x, y = source
        return _array_set(np.asarray(x), np.asarray(y), "arrays", sample_shape, signature)
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise InputError(f"{path}: samples must be a folder or a .npz file")
        return _npz_set(path, sample_shape, signature)
    return _folder_set(path, signature, preprocessing, class_names)


def _npz_set(path: Path, sample_shape, signature: Signature) -> SampleSet:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise InputError(f"{path}: .npz lacks array(s) {', '.join(sorted(missing))}")
            x, y = archive["x"], archive["y"]
    except (ValueError, OSError) as error:
        raise InputError(f"{path}: not a readable .npz ({error})") from None
    return _array_set(x, y, str(path), sample_shape, signature)


def _array_set(x: np.ndarray, y: np.ndarray, origin: str, sample_shape, signature) -> SampleSet:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InputError(f"{origin}: labels y must be a 1-D integer array")
    if len(x) != len(y):
        raise InputError(f"{origin}: x has {len(x)} samples but y has {len(y)} labels")
    if len(x):
        _checked(x[0], sample_shape, origin)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InputError(f"{origin}: samples hold NaN or Inf values")
    return SampleSet(
        labels=y.astype(np.int64),
        origin=origin,
        arrays=x,
        shape=sample_shape,
        dtype=signature.input_dtype,
    )


def _folder_set(
    folder: Path, signature: Signature, preprocessing: Preprocessing, class_names
) -> SampleSet:
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise InputError(f"{folder}: no class subfolders (expected e.g. {folder}/0, {folder}/1)")
    indices = _class_indices([p.name for p in class_dirs], class_names, folder)
    files, labels, skipped = [], [], 0
    for class_dir, label in zip(class_dirs, indices):
        found = 0
        for path in sorted(class_dir.iterdir()):
            if (
                path.is_file()
                and not path.name.startswith(".")
                and path.suffix.lower() in (*IMAGE_SUFFIXES, ARRAY_SUFFIX)
            ):
                files.append(path)
                labels.append(label)
                found += 1
            else:
                skipped += 1
        if not found:
            raise InputError(f"{class_dir}: no sample files ({', '.join(IMAGE_SUFFIXES)}, .npy)")
    return SampleSet(
        labels=np.asarray(labels, dtype=np.int64),
        origin=str(folder),
        files=files,
        skipped_files=skipped,
        shape=signature.input_shape[1:],
        dtype=signature.input_dtype,
        image_format=image_format(signature, preprocessing),
    )


def _class_indices(names: list[str], class_names, folder: Path) -> list[int]:
    """Folder names as class indices: numbers as they are, else `class_names` or sorted."""
    if class_names is not None:
        position = {name: i for i, name in enumerate(class_names)}
        unknown = [n for n in names if n not in position]
        if unknown:
            raise InputError(f"{folder}: folder(s) {', '.join(unknown)} not in --class-names")
        return [position[n] for n in names]
    if all(n.isascii() and n.isdigit() for n in names):
        return [int(n) for n in names]
    return list(range(len(names)))


def image_format(signature: Signature, preprocessing: Preprocessing) -> ImageFormat:
    """Read channels, spatial size and layout off the model's input shape."""
    shape = signature.input_shape[1:]
    if len(shape) == 3:
        layout = preprocessing.layout or _guess_layout(shape)
        channels, height, width = shape if layout == "nchw" else (shape[2], shape[0], shape[1])
        size = (width, height) if width and height else None
        if channels not in IMAGE_MODES:
            channels = None
        return _format(channels, size, layout, preprocessing, None)
    if len(shape) == 2 and all(shape):
        return _format(1, (shape[1], shape[0]), "flat", preprocessing, shape)
    if len(shape) == 1 and shape[0] and round(shape[0] ** 0.5) ** 2 == shape[0]:
        side = round(shape[0] ** 0.5)
        return _format(1, (side, side), "flat", preprocessing, shape)
    return _format(None, None, "flat", preprocessing, shape)


def _format(channels, size, layout, preprocessing, flat_shape) -> ImageFormat | None:
    if channels is None:
        return None  # images cannot feed this input; `.npy` samples still can
    for name in ("mean", "std"):
        values = getattr(preprocessing, name)
        if values is not None and len(values) not in (1, channels):
            raise InputError(
                f"--{name} has {len(values)} values but the model's images have "
                f"{channels} channel(s)"
            )
    return ImageFormat(channels, size, layout, preprocessing, flat_shape)


def _guess_layout(shape: tuple[int | None, ...]) -> str:
    if shape[0] in IMAGE_MODES:
        return "nchw"
    if shape[2] in IMAGE_MODES:
        return "nhwc"
    return "nchw"


def select_samples(
    labels: np.ndarray,
    forget_classes: Sequence[int],
    retain_per_class: int,
    forget_samples: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded choice of retain indices (per kept class) and forget indices (their union)."""
    rng = np.random.default_rng(seed)
    forgotten = np.isin(labels, forget_classes)
    retain = []
    for label in np.unique(labels[~forgotten]):
        members = np.flatnonzero(labels == label)
        retain.append(_choose(rng, members, retain_per_class))
    forget = _choose(rng, np.flatnonzero(forgotten), forget_samples)
    retain = np.sort(np.concatenate(retain)) if retain else np.zeros(0, dtype=np.int64)
    return retain, forget


def _choose(rng: np.random.Generator, members: np.ndarray, count: int) -> np.ndarray:
    if len(members) <= count:
        return members
    return np.sort(rng.choice(members, size=count, replace=False))
