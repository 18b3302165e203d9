"""Bad sample folders and files fed to the CLI.

Class folders with nothing but README or .DS_Store files, class folders beyond the
model's classes, forgetting every class or a class without samples, truncated,
mislabelled or decompression-bomb images, `.npy` arrays that need pickle, are complex or
hold NaN, `.npz` files with Inf, without `x`, that are plain `.npy` or that inflate past
`--max-sample-bytes`, sample files over that limit, and held-out samples with a corrupt
image: each is refused with exit 2 naming the file or folder, every file of the run's
folder unchanged and nothing new written. Mixed folders of images, arrays and non-sample
files are accepted, the non-sample files skipped and counted in the report. Bad samples
test_cli.py already covers (missing or empty folders, `.npz` without `y`, ...) are not
repeated here.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    EXIT_USAGE,
    MODEL,
    SAMPLES,
    forget_args,
    png_folder,
    run_cli,
    setup_id,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Over twice Pillow's MAX_IMAGE_PIXELS (89,478,485): a decompression bomb by its size alone.
BOMB_SIDE = 20_000

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _only_non_sample_files(tmp):
    root = png_folder(tmp / "samples", classes=(3,))
    (root / "4").mkdir()
    (root / "4" / "README").write_text("nothing here\n")
    (root / "4" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return forget_args(MODEL.name, "samples"), EXIT_USAGE, ("samples/4", "no sample files")


def _class_folder_beyond_the_model(tmp):
    root = png_folder(tmp / "samples", classes=(3, 4))
    shutil.copytree(root / "4", root / "12")
    return forget_args(MODEL.name, "samples"), EXIT_USAGE, ("class 12", "10 classes")


def _forget_every_class(tmp):
    every = ",".join(map(str, range(10)))
    return [MODEL.name, "--forget-class", every, "--samples", SAMPLES], EXIT_USAGE, ("every class",)


def _forget_class_without_samples(tmp):
    png_folder(tmp / "samples", classes=(4, 5))
    return forget_args(MODEL.name, "samples"), EXIT_USAGE, ("samples", "no samples of class 3")


def _truncated_png(tmp):
    root = png_folder(tmp / "samples")
    data = (SAMPLES / "3" / "0000.png").read_bytes()
    (root / "3" / "cut.png").write_bytes(data[: len(data) // 2])
    return forget_args(MODEL.name, "samples"), EXIT_USAGE, ("cut.png", "not a readable")


def _decompression_bomb(tmp):
    root = png_folder(tmp / "samples")
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 0, 0, 0, 0)
    bomb = PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")
    (root / "3" / "bomb.png").write_bytes(bomb)
    return forget_args(MODEL.name, "samples"), EXIT_USAGE, ("bomb.png", "decompression bomb")


def _other_format_named_png(tmp):
    root = png_folder(tmp / "samples")
    Image.new("L", (28, 28)).save(root / "3" / "really.png", format="GIF")
    return forget_args(MODEL.name, "samples"), EXIT_USAGE, ("really.png", "PNG, JPEG, BMP, WEBP")


def _npy_that_needs_pickle(tmp):
    root = png_folder(tmp / "samples")
    np.save(root / "3" / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return forget_args(MODEL.name, "samples"), EXIT_USAGE, ("objects.npy", "pickle")


def _npy_of_complex_numbers(tmp):
    root = png_folder(tmp / "samples")
    np.save(root / "3" / "complex.npy", np.zeros((1, 28, 28), np.complex64))
    return forget_args(MODEL.name, "samples"), EXIT_USAGE, ("complex.npy", "dtype complex64")


def _npy_with_nan(tmp):
    root = png_folder(tmp / "samples")
    array = np.zeros((1, 28, 28), np.float32)
    array[0, 3, 4] = np.nan
    np.save(root / "3" / "nan.npy", array)
    return forget_args(MODEL.name, "samples"), EXIT_USAGE, ("nan.npy", "NaN or Inf")


def _npz_with_inf(tmp):
    x = np.zeros((4, 1, 28, 28), np.float32)
    x[2, 0, 0, 0] = np.inf
    np.savez(tmp / "inf.npz", x=x, y=np.array([3, 3, 4, 4]))
    return forget_args(MODEL.name, "inf.npz"), EXIT_USAGE, ("inf.npz", "NaN or Inf")


def _npz_without_x(tmp):
    np.savez(tmp / "y_only.npz", y=np.array([3, 4]))
    return forget_args(MODEL.name, "y_only.npz"), EXIT_USAGE, ("y_only.npz", "lacks array(s) x")


def _npy_named_npz(tmp):
    np.save(tmp / "plain.npy", np.zeros((4, 1, 28, 28), np.float32))
    (tmp / "plain.npy").rename(tmp / "plain.npz")
    return forget_args(MODEL.name, "plain.npz"), EXIT_USAGE, ("plain.npz", "not a readable .npz")


def _npz_bomb(tmp):
    x = np.zeros((3000, 1, 28, 28), np.float32)  # 9.4 MB that compress to some 10 kB
    np.savez_compressed(tmp / "bomb.npz", x=x, y=np.zeros(3000, np.int64))
    args = forget_args(MODEL.name, "bomb.npz", "--max-sample-bytes", "1000000")
    return args, EXIT_USAGE, ("bomb.npz", "--max-sample-bytes")


def _eval_samples_with_a_corrupt_image(tmp):
    """Held-out samples are read before the output is written, so nothing is left."""
    root = png_folder(tmp / "samples")
    (root / "4" / "corrupt.png").write_bytes(PNG_SIGNATURE + b"\0" * 64)
    args = forget_args(MODEL.name, SAMPLES, "--eval-samples", "samples", "-o", "out.onnx")
    return args, EXIT_USAGE, ("corrupt.png", "not a readable")


def _sample_file_over_the_limit(tmp):
    png_folder(tmp / "samples")
    args = forget_args(MODEL.name, "samples", "--max-sample-bytes", "200")
    return args, EXIT_USAGE, ("samples/3/0000.png", "--max-sample-bytes")


@pytest.mark.parametrize(
    "setup",
    [
        _only_non_sample_files,
        _class_folder_beyond_the_model,
        _forget_every_class,
        _forget_class_without_samples,
        _truncated_png,
        _decompression_bomb,
        _other_format_named_png,
        _npy_that_needs_pickle,
        _npy_of_complex_numbers,
        _npy_with_nan,
        _npz_with_inf,
        _npz_without_x,
        _npy_named_npz,
        _npz_bomb,
        _sample_file_over_the_limit,
        _eval_samples_with_a_corrupt_image,
    ],
    ids=setup_id,
)
def test_bad_samples_are_refused(refusals, setup):
    """Bad sample folders and files: exit 2, the file or folder named, nothing written."""
    refusals[setup].check()


def test_mixed_folders_and_non_sample_files_are_skipped_and_counted(tmp_path, model):
    """Images and `.npy` arrays mix freely; README and .DS_Store, in class folders or at the
    top, are skipped and counted in the report."""
    root = png_folder(tmp_path / "samples", classes=range(10), per_class=3)
    rng = np.random.default_rng(0)
    for label in (3, 7):
        np.save(root / str(label) / "extra.npy", rng.random((1, 28, 28), np.float32))
    (root / "README").write_text("digits\n")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "3" / "notes.txt").write_text("hand-picked\n")
    every = ("--depth", "all")  # a depth search would hold some samples back to validate on
    process = run_cli(
        *forget_args(MODEL.name, "samples"), *every, "--report", "r.json", cwd=tmp_path
    )
    assert process.returncode == 0, process.stderr
    samples = json.loads((tmp_path / "r.json").read_text())["samples"]
    assert samples["skipped_files"] == 3
    assert (samples["retain"], samples["forget"]) == (9 * 3 + 1, 4)
