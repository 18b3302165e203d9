"""Sample sets from folders, `.npz` files or arrays, decoded batch by batch on demand."""

from __future__ import annotations

import math
import os
import struct
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from .errors import InputError
from .options import DEFAULT_MAX_SAMPLE_BYTES, Preprocessing
from .signature import Signature

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# The only decoders Pillow may run on a sample file, one per suffix above: no other
# plugin (EPS through Ghostscript, PSD, ...) ever sees it, whatever its bytes claim.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
# What Pillow's decoders raise on corrupt or hostile files (its own fuzzers' list).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
ARRAY_SUFFIX = ".npy"
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# What zipfile and zlib raise on a corrupt, encrypted or oddly compressed archive.
ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error)
# Folder names taken as class indices must fit the int64 labels with room to spare.
MAX_CLASS_INDEX = 2**31 - 1
SAMPLE_LIMIT_HINT = "raise max_sample_bytes if it is meant to be this large"
SAMPLE_LIMIT_OPTION = ("max_sample_bytes",)
IN_MEMORY = "arrays"  # the origin of samples given as arrays
ClassNames = Sequence[str] | str | os.PathLike  # the names, or a file of one name a line


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
    max_file_bytes: int = DEFAULT_MAX_SAMPLE_BYTES

    @property
    def paths(self) -> tuple[Path, ...]:
        """What a run reads the samples from: the folder and its files, or the `.npz`."""
        if self.files is not None:
            return (Path(self.origin), *self.files)
        return () if self.origin == IN_MEMORY else (Path(self.origin),)

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
                with path.open("rb") as stream:
                    array = _read_array(stream, path, self.max_file_bytes, self.shape)
            except OSError as error:
                raise InputError(f"{path}: cannot read the sample ({error.strerror})") from None
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

    def _fitted(self, image: Image.Image, path: Path) -> Image.Image:
        """The image at the model's input size: its shorter side resized and its centre
        cut first when asked (torchvision's `Resize` then `CenterCrop`), then stretched."""
        method = RESAMPLING[self.preprocessing.interpolation]
        resize, crop = self.preprocessing.resize, self.preprocessing.crop
        if resize is not None:
            width, height = image.size
            short, long = sorted((width, height))
            longer = max(1, int(resize * long / short))
            image = image.resize((resize, longer) if width <= height else (longer, resize), method)
        if crop is not None:
            width, height = image.size
            if crop > min(width, height):
                raise InputError(
                    f"{path}: {width} x {height} pixels, smaller than the crop of {crop}; "
                    "resize it first (resize) or crop less",
                    ("crop",),
                )
            left, top = round((width - crop) / 2), round((height - crop) / 2)
            image = image.crop((left, top, left + crop, top + crop))
        if self.size is not None and image.size != self.size:
            image = image.resize(self.size, method)
        return image

    def decode(self, path: Path) -> np.ndarray:
        """Decode with the accepted formats only; Pillow's pixel limit is an error here,
        not the warning it is below twice the limit."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path, formats=IMAGE_FORMATS) as image:
                    image = image.convert(IMAGE_MODES[self.channels])
                    pixels = np.asarray(self._fitted(image, path), dtype=np.float32)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise InputError(
                f"{path}: refused as a possible decompression bomb ({error}); "
                "resize the image towards the model's input size"
            ) from None
        except IMAGE_ERRORS as error:
            raise InputError(
                f"{path}: not a readable {', '.join(IMAGE_FORMATS)} image ({error}); "
                "re-save or remove it"
            ) from None
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
    _check_layout(array.dtype, array.shape, shape, path)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{path}: sample holds NaN or Inf values")
    return array


def _check_layout(dtype: np.dtype, have: tuple[int, ...], shape: tuple[int | None, ...], path):
    """Refuse a dtype that is not numbers or a shape the model's input does not have."""
    if dtype.kind not in "fiub":
        raise InputError(f"{path}: sample has dtype {dtype}, expected numbers")
    if len(have) != len(shape) or any(
        want is not None and size != want for size, want in zip(have, shape)
    ):
        raise InputError(f"{path}: sample shape {list(have)}, model expects {_shape_text(shape)}")


def _read_array(
    stream: BinaryIO, where, max_bytes: int, shape: tuple[int | None, ...] | None
) -> np.ndarray:
    """A `.npy` array read only once its header passed: numbers (so never pickle), of the
    model's `shape` when given, and at most `max_bytes` of data."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            have, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            have, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except (ValueError, TypeError, SyntaxError, EOFError) as error:
        raise InputError(f"{where}: not a readable .npy array ({error})") from None
    if dtype.hasobject:
        raise InputError(
            f"{where}: an array of Python objects, which only pickle could load (never done "
            "here); save plain numbers"
        )
    if shape is not None:
        _check_layout(dtype, have, shape, where)
    size = math.prod(have) * dtype.itemsize
    if size > max_bytes:
        raise InputError(
            f"{where}: the array holds {size} bytes, over the limit of {max_bytes}; "
            f"{SAMPLE_LIMIT_HINT}",
            SAMPLE_LIMIT_OPTION,
        )
    stream.seek(0)
    try:
        return np.lib.format.read_array(stream, allow_pickle=False)
    except (ValueError, EOFError) as error:
        raise InputError(f"{where}: not a readable .npy array ({error})") from None


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def open_samples(
    source: str | os.PathLike | tuple[np.ndarray, np.ndarray],
    signature: Signature,
    preprocessing: Preprocessing,
    class_names: ClassNames | None = None,
    max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> SampleSet:
    """Open a class-per-folder tree, a `.npz` with `x` and `y`, or `(x, y)` arrays.

    No sample file over `max_bytes` is read (a `.npz` counts its arrays uncompressed).
    """
    sample_shape = signature.input_shape[1:]
    if isinstance(source, tuple):
        x, y = source
        return _array_set(np.asarray(x), np.asarray(y), IN_MEMORY, sample_shape, signature)
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        names = read_class_names(class_names, max_bytes)
        return _folder_set(path, signature, preprocessing, names, max_bytes)
    if not path.is_file() or path.suffix.lower() != ".npz":
        raise InputError(f"{path}: samples must be a folder or a .npz file")
    _check_size(path, max_bytes)
    return _npz_set(path, sample_shape, signature, max_bytes)


def _check_size(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(
            f"{path}: {size} bytes, over the limit of {max_bytes}; {SAMPLE_LIMIT_HINT}",
            SAMPLE_LIMIT_OPTION,
        )


def _npz_set(path: Path, sample_shape, signature: Signature, max_bytes: int) -> SampleSet:
    """`x` and `y` of a `.npz` read straight from the zip, headers first: a renamed `.npy`,
    a pickle or a compressed bomb is refused before any of its data is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            missing = sorted(name for name in ("x", "y") if name + ARRAY_SUFFIX not in names)
            if missing:
                raise InputError(
                    f"{path}: .npz lacks array(s) {', '.join(missing)}; save it with "
                    "np.savez(path, x=inputs, y=labels)"
                )
            with archive.open("x" + ARRAY_SUFFIX) as stream:
                x = _read_array(stream, f"{path}: x", max_bytes, (None, *sample_shape))
            with archive.open("y" + ARRAY_SUFFIX) as stream:
                y = _read_array(stream, f"{path}: y", max_bytes - x.nbytes, None)
    except ZIP_ERRORS as error:
        raise InputError(f"{path}: not a readable .npz ({error})") from None
    return _array_set(x, y, str(path), sample_shape, signature)


def _array_set(x: np.ndarray, y: np.ndarray, origin: str, sample_shape, signature) -> SampleSet:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InputError(f"{origin}: labels y must be a 1-D integer array")
    if len(y) and (y.min() < 0 or y.max() > MAX_CLASS_INDEX):
        raise InputError(f"{origin}: labels y must be class indices (0 or more)")
    if x.ndim != len(sample_shape) + 1:
        raise InputError(
            f"{origin}: x has shape {list(x.shape)}, expected [N, *{_shape_text(sample_shape)}]"
        )
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
    folder: Path, signature: Signature, preprocessing: Preprocessing, class_names, max_bytes: int
) -> SampleSet:
    """List every class folder's sample files; anything else there is skipped and counted,
    and a sample file over `max_bytes` is refused before a run starts."""
    entries = _entries(folder)
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not class_dirs:
        raise InputError(f"{folder}: no class subfolders (expected e.g. {folder}/0, {folder}/1)")
    indices = _class_indices([p.name for p in class_dirs], class_names, folder)
    files, labels = [], []
    skipped = sum(1 for p in entries if not p.is_dir())
    for class_dir, label in zip(class_dirs, indices):
        found = 0
        for path in _entries(class_dir):
            if (
                path.is_file()
                and not path.name.startswith(".")
                and path.suffix.lower() in (*IMAGE_SUFFIXES, ARRAY_SUFFIX)
            ):
                _check_size(path, max_bytes)
                files.append(path)
                labels.append(label)
                found += 1
            else:
                skipped += 1
        if not found:
            raise InputError(
                f"{class_dir}: no sample files ({', '.join(IMAGE_SUFFIXES)}, .npy); add some "
                "or remove the folder"
            )
    return SampleSet(
        labels=np.asarray(labels, dtype=np.int64),
        origin=str(folder),
        files=files,
        skipped_files=skipped,
        shape=signature.input_shape[1:],
        dtype=signature.input_dtype,
        image_format=image_format(signature, preprocessing),
        max_file_bytes=max_bytes,
    )


def read_class_names(names: ClassNames | None, max_bytes: int) -> Sequence[str] | None:
    """Class names as given, or read from a file of one name a line (blank lines skipped)."""
    if not isinstance(names, (str, os.PathLike)):
        return names
    path = Path(names)
    try:
        if not path.is_file():
            raise InputError(f"{path}: class names file not found")
        _check_size(path, max_bytes)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the class names ({error})") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as error:
        raise InputError(f"{folder}: cannot list the folder ({error.strerror})") from None


def _class_indices(names: list[str], class_names, folder: Path) -> list[int]:
    """Folder names as class indices: numbers as they are, else `class_names` or sorted."""
    if class_names is not None:
        position = {name: i for i, name in enumerate(class_names)}
        unknown = [n for n in names if n not in position]
        if unknown:
            raise InputError(
                f"{folder}: folder(s) {', '.join(unknown)} not in class_names", ("class_names",)
            )
        return [position[n] for n in names]
    if all(n.isascii() and n.isdigit() for n in names):
        beyond = [n for n in names if int(n) > MAX_CLASS_INDEX]
        if beyond:
            raise InputError(f"{folder}: folder {beyond[0]} is too large to be a class index")
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
                f"{name} has {len(values)} values but the model's images have "
                f"{channels} channel(s)",
                (name,),
            )
    return ImageFormat(channels, size, layout, preprocessing, flat_shape)


def _guess_layout(shape: tuple[int | None, ...]) -> str:
    if shape[0] in IMAGE_MODES:
        return "nchw"
    if shape[2] in IMAGE_MODES:
        return "nhwc"
    return "nchw"
