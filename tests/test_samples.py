"""The sample loaders: folders of images or arrays, `.npz` files, preprocessing, selection."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import onnx_forget
from onnx_forget.errors import InputError
from onnx_forget.options import Preprocessing
from onnx_forget.samples import open_samples
from onnx_forget.selection import select_samples
from onnx_forget.signature import Signature, read_signature
from tests import models
from tests.helpers import FIXTURES, MODEL, SAMPLES, run_model

# The tiny image models: [N, 3, HEIGHT, WIDTH] (or NHWC), unequal sides to catch swaps.
HEIGHT, WIDTH = 20, 16
FILE_WIDTH, FILE_HEIGHT = 40, 30


@pytest.fixture(scope="module")
def signature() -> Signature:
    """The fixture CNN's signature: input [N, 1, 28, 28] float32, logits [N, 10]."""
    return read_signature(onnx.load(MODEL))


def _image_model(input_dims: tuple[int, ...], nhwc: bool = False) -> onnx.ModelProto:
    """Conv (3 -> 2 channels, 3x3) -> GlobalAveragePool -> Flatten: scores [N, 2]."""
    weight = np.random.default_rng(0).normal(size=(2, 3, 3, 3)).astype(np.float32)
    nodes, source = [], "x"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
        source = "x_nchw"
    nodes += [
        helper.make_node("Conv", [source, "w"], ["conv"], name="conv"),
        helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["scores"]),
    ]
    return models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_dims])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(weight, "w")],
    )


def _gradient(seed: int) -> np.ndarray:
    """A uint8 [FILE_HEIGHT, FILE_WIDTH] pattern that differs along both axes."""
    rows = np.arange(FILE_HEIGHT)[:, None] * 7
    columns = np.arange(FILE_WIDTH)[None, :] * 3
    return ((rows + columns + 40 * seed) % 256).astype(np.uint8)


def _npy_folder(root: Path, names, per_class: int = 2, seed: int = 0) -> dict[Path, np.ndarray]:
    """Class folders of preprocessed [1, 28, 28] float32 `.npy` samples; path -> array."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = rng.normal(size=(1, 28, 28)).astype(np.float32)
            np.save(root / name / f"{i}.npy", array)
            written[root / name / f"{i}.npy"] = array
    return written


class _Trap:
    """Unpickling it makes the folder `path`: proof that a loader ran pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --- formats --------------------------------------------------------------------------


def test_png_folder_loads_as_pixels_over_255(signature):
    """The fixture digits load as float32 [1000, 1, 28, 28] equal to Pillow's pixels / 255."""
    samples = open_samples(SAMPLES, signature, Preprocessing())
    assert np.array_equal(samples.labels, np.repeat(np.arange(10), 100))
    batch = samples.load(np.arange(len(samples)))
    assert batch.dtype == np.float32 and batch.shape == (1000, 1, 28, 28)
    expected = np.stack(
        [
            np.asarray(Image.open(SAMPLES / str(c) / f"{i:04d}.png"), dtype=np.float32)[None] / 255
            for c in range(10)
            for i in range(100)
        ]
    )
    np.testing.assert_allclose(batch, expected, rtol=1e-6, atol=0)
    assert samples.skipped_files == 0


def test_npy_samples_load_unchanged(tmp_path, signature):
    """Preprocessed `.npy` samples (negative values too) are neither scaled nor shifted."""
    written = _npy_folder(tmp_path, ["0", "1"], per_class=3)
    samples = open_samples(tmp_path, signature, Preprocessing(scale=1 / 255, mean=(0.5,)))
    assert samples.labels.tolist() == [0, 0, 0, 1, 1, 1]
    batch = samples.load(np.arange(6))
    assert batch.dtype == np.float32
    assert np.array_equal(batch, np.stack([written[path] for path in sorted(written)]))


def test_object_npy_sample_is_refused_without_unpickling(tmp_path, signature):
    """An object-dtype `.npy` (saved with allow_pickle=True) is an InputError; no pickle ran."""
    marker = tmp_path / "unpickled"
    (tmp_path / "samples" / "0").mkdir(parents=True)
    trap = tmp_path / "samples" / "0" / "trap.npy"
    np.save(trap, np.array([_Trap(marker)], dtype=object), allow_pickle=True)
    samples = open_samples(tmp_path / "samples", signature, Preprocessing())
    with pytest.raises(InputError, match=r"trap\.npy"):
        samples.load(np.arange(1))
    assert not marker.exists()
    np.load(trap, allow_pickle=True)  # the trap is live: loading it with pickle fires it
    assert marker.exists()


def test_object_npz_is_refused_without_unpickling(tmp_path, signature):
    """A `.npz` whose x is an object array is an InputError; no pickle ran."""
    marker = tmp_path / "unpickled"
    np.savez(
        tmp_path / "trap.npz",
        x=np.array([_Trap(marker)], dtype=object),
        y=np.zeros(1, np.int64),
    )
    with pytest.raises(InputError, match=r"trap\.npz"):
        open_samples(tmp_path / "trap.npz", signature, Preprocessing())
    assert not marker.exists()


# --- class folders --------------------------------------------------------------------


def test_folder_names_that_are_not_numbers_map_in_sorted_order(tmp_path, signature):
    """Folders dog, cat, bird become 2, 1, 0 (sorted); hidden folders are ignored."""
    written = _npy_folder(tmp_path, ["dog", "cat", "bird", ".cache"])
    samples = open_samples(tmp_path, signature, Preprocessing())
    by_name = {"bird": 0, "cat": 1, "dog": 2}
    assert [by_name[path.parent.name] for path in samples.files] == samples.labels.tolist()
    assert sorted(samples.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert all(path.parent.name != ".cache" for path in samples.files)
    assert len(written) == 8  # the hidden folder held samples too


def test_class_names_give_the_folder_indices(tmp_path, signature):
    """With class_names (dog, cat, bird) the folders become 0, 1, 2 in that order."""
    _npy_folder(tmp_path, ["dog", "cat", "bird"])
    samples = open_samples(tmp_path, signature, Preprocessing(), ("dog", "cat", "bird"))
    position = {"dog": 0, "cat": 1, "bird": 2}
    assert [position[path.parent.name] for path in samples.files] == samples.labels.tolist()
    with pytest.raises(InputError, match="bird"):
        open_samples(tmp_path, signature, Preprocessing(), ("dog", "cat"))


def test_numeric_folder_names_are_the_class_indices(tmp_path, signature):
    """Folders 2, 10 and 007 are classes 2, 10 and 7, not their sorted positions."""
    _npy_folder(tmp_path, ["2", "10", "007"], per_class=1)
    samples = open_samples(tmp_path, signature, Preprocessing())
    assert {path.parent.name: int(label) for path, label in zip(samples.files, samples.labels)} == {
        "2": 2,
        "10": 10,
        "007": 7,
    }


def test_digit_like_folder_names_that_are_not_numbers_map_in_sorted_order(tmp_path, signature):
    """Folders 1 and ² (not an int) are names, not numbers: sorted order gives 0 and 1."""
    _npy_folder(tmp_path, ["1", "²"], per_class=1)
    samples = open_samples(tmp_path, signature, Preprocessing())
    assert [path.parent.name for path in samples.files] == ["1", "²"]
    assert samples.labels.tolist() == [0, 1]


def test_hidden_files_in_class_folders_are_skipped(tmp_path, signature):
    """A '._0000.png' resource-fork file beside 0000.png is skipped, not decoded."""
    (tmp_path / "0").mkdir()
    shutil.copy(SAMPLES / "0" / "0000.png", tmp_path / "0" / "0000.png")
    (tmp_path / "0" / "._0000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(78))
    samples = open_samples(tmp_path, signature, Preprocessing())
    samples.load(np.arange(len(samples)))
    assert len(samples) == 1 and samples.skipped_files == 1


# --- preprocessing, channels, sizes, layouts -------------------------------------------


@pytest.mark.parametrize(
    "preprocessing",
    [
        Preprocessing(scale=1 / 255, mean=(0.1307,), std=(0.3081,)),
        Preprocessing(scale=1.0, mean=(127.5,), std=(127.5,)),
    ],
    ids=["mnist-normalised", "minus-one-to-one"],
)
def test_mean_and_std_give_scaled_pixels_minus_mean_over_std(signature, preprocessing):
    """Preprocessing(scale, mean, std) gives `(pixel * scale - mean) / std`."""
    samples = open_samples(SAMPLES, signature, preprocessing)
    indices = np.array([0, 345, 999])
    pixels = np.stack(
        [np.asarray(Image.open(samples.files[i]), dtype=np.float64)[None] for i in indices]
    )
    expected = (pixels * preprocessing.scale - preprocessing.mean[0]) / preprocessing.std[0]
    np.testing.assert_allclose(samples.load(indices), expected, rtol=1e-5, atol=1e-5)


def test_rgb_input_gets_grayscale_files_as_three_channels_resized(tmp_path):
    """A 40x30 grayscale file feeds [N, 3, 20, 16]: three equal channels, bilinear-resized."""
    model = _image_model((3, HEIGHT, WIDTH))
    for label in (0, 1):
        (tmp_path / str(label)).mkdir()
        Image.fromarray(_gradient(label)).save(tmp_path / str(label) / "a.png")
    samples = open_samples(tmp_path, read_signature(model), Preprocessing())
    batch = samples.load(np.arange(2))
    assert batch.dtype == np.float32 and batch.shape == (2, 3, HEIGHT, WIDTH)
    assert np.array_equal(batch[:, 0], batch[:, 1]) and np.array_equal(batch[:, 0], batch[:, 2])
    expected = np.stack(
        [
            np.asarray(
                Image.open(path).convert("RGB").resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR),
                dtype=np.float32,
            ).transpose(2, 0, 1)
            / 255
            for path in samples.files
        ]
    )
    np.testing.assert_allclose(batch, expected, rtol=1e-6, atol=0)
    assert run_model(model, batch).shape == (2, 2)


def test_rgb_mean_and_std_apply_per_channel_in_rgb_order(tmp_path):
    """A per-channel mean/std is applied to R, G, B in that order."""
    model = _image_model((3, HEIGHT, WIDTH))
    rgb = np.stack([np.full((HEIGHT, WIDTH), value, np.uint8) for value in (200, 100, 50)], -1)
    (tmp_path / "0").mkdir()
    Image.fromarray(rgb).save(tmp_path / "0" / "a.png")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    samples = open_samples(tmp_path, read_signature(model), Preprocessing(1 / 255, mean, std))
    batch = samples.load(np.arange(1))
    for channel, value in enumerate((200, 100, 50)):
        expected = (value / 255 - mean[channel]) / std[channel]
        np.testing.assert_allclose(batch[0, channel], expected, rtol=1e-5)


def test_nhwc_input_gets_hwc_arrays(tmp_path):
    """An input [N, 20, 16, 3] gets [n, 20, 16, 3] arrays: channels last, resized."""
    model = _image_model((HEIGHT, WIDTH, 3), nhwc=True)
    (tmp_path / "0").mkdir()
    Image.fromarray(_gradient(0)).save(tmp_path / "0" / "a.png")
    samples = open_samples(tmp_path, read_signature(model), Preprocessing())
    batch = samples.load(np.arange(1))
    assert batch.shape == (1, HEIGHT, WIDTH, 3)
    expected = (
        np.asarray(
            Image.open(samples.files[0])
            .convert("RGB")
            .resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR),
            dtype=np.float32,
        )
        / 255
    )
    np.testing.assert_allclose(batch[0], expected, rtol=1e-6, atol=0)
    assert run_model(model, batch).shape == (1, 2)


def test_image_files_for_an_input_that_takes_no_images_are_an_input_error(tmp_path):
    """PNG samples for a [N, 2, 8, 8] input are refused with an InputError."""
    signature = Signature("x", (None, 2, 8, 8), np.dtype(np.float32), "scores", 3)
    (tmp_path / "0").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "0" / "a.png")
    samples = open_samples(tmp_path, signature, Preprocessing())
    with pytest.raises(InputError):
        samples.load(np.arange(1))


# --- select_samples -------------------------------------------------------------------

# Class sizes 50, 8, 40, 30, 25; classes 2 and 3 forgotten.
LABELS = np.repeat(np.arange(5), [50, 8, 40, 30, 25])
FORGET = [2, 3]
RETAIN_PER_CLASS, FORGET_SAMPLES = 10, 20


def test_select_samples_caps_each_set_and_never_mixes_them():
    """At most retain_per_class per kept class (all of a small one), at most
    forget_samples from the forgotten classes together, no index in both."""
    retain, forget = select_samples(LABELS, FORGET, RETAIN_PER_CLASS, FORGET_SAMPLES, seed=0)
    counts = {c: int(np.sum(LABELS[retain] == c)) for c in (0, 1, 4)}
    assert counts == {0: 10, 1: 8, 4: 10}
    assert len(retain) == 28 and len(np.unique(retain)) == 28
    assert not np.isin(LABELS[retain], FORGET).any()
    assert len(forget) == FORGET_SAMPLES and len(np.unique(forget)) == FORGET_SAMPLES
    assert np.isin(LABELS[forget], FORGET).all()
    assert not np.intersect1d(retain, forget).size


def test_select_samples_takes_every_forget_sample_under_the_cap():
    """With forget_samples above the forgotten classes' size, every one of them is used."""
    _, forget = select_samples(LABELS, FORGET, RETAIN_PER_CLASS, 500, seed=0)
    assert np.array_equal(np.sort(forget), np.flatnonzero(np.isin(LABELS, FORGET)))


def test_select_samples_is_deterministic_per_seed():
    """The same seed picks the same indices; another seed picks others."""
    first = select_samples(LABELS, FORGET, RETAIN_PER_CLASS, FORGET_SAMPLES, seed=7)
    again = select_samples(LABELS, FORGET, RETAIN_PER_CLASS, FORGET_SAMPLES, seed=7)
    other = select_samples(LABELS, FORGET, RETAIN_PER_CLASS, FORGET_SAMPLES, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[1], other[1])


def test_resize_then_centre_crop_as_torchvision_evaluates(tmp_path):
    """`resize` sets the shorter side, `crop` cuts the centre square: the same pixels as
    the steps done by hand with Pillow (torchvision's Resize, then CenterCrop)."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8))
    (tmp_path / "0").mkdir()
    photo.save(tmp_path / "0" / "photo.png")
    signature = Signature("x", (None, 3, 64, 64), np.dtype(np.float32), "scores", 2)
    for interpolation, method in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        preprocessing = Preprocessing(scale=1.0, resize=80, crop=64, interpolation=interpolation)
        loaded = open_samples(tmp_path, signature, preprocessing).load(np.array([0]))[0]
        by_hand = photo.resize((120, 80), method).crop((28, 8, 92, 72))
        expected = np.asarray(by_hand, dtype=np.float32).transpose(2, 0, 1)
        assert np.array_equal(loaded, expected)


def test_a_crop_larger_than_the_resized_image_is_refused(tmp_path):
    (tmp_path / "0").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "0" / "small.png")
    signature = Signature("x", (None, 3, 16, 16), np.dtype(np.float32), "scores", 2)
    samples = open_samples(tmp_path, signature, Preprocessing(crop=32))
    with pytest.raises(InputError, match="smaller than the crop"):
        samples.load(np.array([0]))


def test_imagenet_folder_names_map_through_a_real_class_file():
    """WordNet-id folders (`n02124075`) map through the 1,000-line ImageNet class file to
    the indices a real pretrained classifier predicts."""
    evaluation = onnx_forget.evaluate(
        FIXTURES / "imagenet_efficientnet_lite0.onnx",
        FIXTURES / "imagenet_photos" / "heldout",
        class_names=FIXTURES / "imagenet_classes.txt",
        preprocessing=Preprocessing(scale=1.0, mean=(127.0,) * 3, std=(128.0,) * 3),
        device="cpu",
    )
    # Egyptian cat, moped, palace, suit, tripod, espresso, daisy
    assert sorted(evaluation.accuracy.per_class) == [285, 665, 698, 834, 872, 967, 985]
    assert evaluation.accuracy.per_class[285] == 100.0  # the cat photo, every crop
    assert evaluation.accuracy.retain > 80.0
