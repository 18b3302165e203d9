"""Properties over arbitrary shapes, checked with hypothesis on derandomized examples.

im2col patches against onnxruntime's own Conv, the orientation rules of the rewrite
(`P = I` changes no bit; a random `P` equals feeding the original layer `P^T x`), and the
sample loaders on random folder trees and random files.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from unittest import mock

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnx_forget import gram
from onnx_forget.errors import InputError
from onnx_forget.gram import GramAccumulator, conv_pads
from onnx_forget.layer_scan import CONV, IN_OUT, scan_layers
from onnx_forget.options import Preprocessing
from onnx_forget.rewrite import rewrite_model
from onnx_forget.samples import open_samples
from onnx_forget.signature import Signature
from tests import models
from tests.helpers import run_model
from tests.models import by_matrix

# Reproducible in CI and quick on two cores: a fixed, small set of examples per property.
BOUNDED = settings(
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")
FLOAT32_EPS = float(np.finfo(np.float32).eps)
# Stored weight types: each is Cast to float for the layer (onnxruntime's CPU provider has
# no bfloat16 Conv/Gemm/MatMul, but does Cast it), float32 is also read directly.
STORED_TYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}
SAMPLE_SHAPE = (1, 28, 28)
SIGNATURE = Signature("input", (None, *SAMPLE_SHAPE), np.dtype(np.float32), "logits", 10)


def _any_shape(name: str, rank: int) -> onnx.ValueInfoProto:
    """A float output of known rank and unnamed sizes."""
    dims = [f"{name}{axis}" for axis in range(rank)]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _eps(dtype) -> float:
    return float(ml_dtypes.finfo(dtype).eps)


def conv_windows(values: np.ndarray, geometry) -> np.ndarray:
    """The reference for conv patches: a view `[N, C, *out, *kernel]` of every receptive
    field, following ONNX Conv (explicit `pads` or `auto_pad`, then strides on the output
    grid and dilations inside the kernel; zero padding, as the convolution sees it)."""
    spatial = len(geometry.kernel)
    reach = [d * (k - 1) + 1 for k, d in zip(geometry.kernel, geometry.dilations)]
    pads = conv_pads(values.shape[2:], reach, geometry)
    padded = np.pad(values, [(0, 0), (0, 0), *zip(pads[:spatial], pads[spatial:])])
    windows = sliding_window_view(padded, reach, axis=tuple(range(2, 2 + spatial)))
    strided = (slice(None), slice(None), *(slice(None, None, s) for s in geometry.strides))
    return windows[strided + tuple(slice(None, None, d) for d in geometry.dilations)]


def _apply(x: np.ndarray, weight: np.ndarray, layer, transform=None) -> np.ndarray:
    """The layer on `x` in float64, with `weight` as the layer sees it; each input vector
    (a row, or a conv's im2col patch) first multiplied by `transform[group]` if given."""
    if layer.orientation != CONV:
        vectors = x if transform is None else x @ transform[0]
        return vectors @ (weight if layer.orientation == IN_OUT else weight.T)
    windows = conv_windows(x, layer.geometry)  # [N, C, *out, *kernel]
    spatial = len(layer.geometry.kernel)
    in_per_group, out_per_group = x.shape[1] // layer.groups, weight.shape[0] // layer.groups
    outputs = []
    for group in range(layer.groups):
        channels = windows[:, group * in_per_group : (group + 1) * in_per_group]
        patches = np.moveaxis(channels, 1, 1 + spatial)
        patches = patches.reshape(*patches.shape[: 1 + spatial], layer.input_size)
        if transform is not None:
            patches = patches @ transform[group]
        rows = weight[group * out_per_group : (group + 1) * out_per_group]
        outputs.append(np.moveaxis(patches @ rows.reshape(len(rows), layer.input_size).T, -1, 1))
    return np.concatenate(outputs, axis=1)


def _float32_tolerance(x: np.ndarray, weight: np.ndarray, layer, weight_eps: float):
    """Elementwise bound on a float32 layer's error: the weight's rounding to its stored
    type (`weight_eps`), a cast to float32, and float32 sums of `d` terms."""
    bound = _apply(np.abs(x), np.abs(weight), layer)
    return (weight_eps + (2 * layer.input_size + 2) * FLOAT32_EPS) * bound


# --- im2col against onnxruntime's Conv -------------------------------------------------


@st.composite
def conv_cases(draw):
    """A Conv of 1 to 3 spatial dims: groups, kernel, strides, dilations, pads or auto_pad."""
    spatial = draw(st.integers(1, 3))
    small = st.integers(1, 2) if spatial == 3 else st.integers(1, 3)
    groups = draw(st.integers(1, 3))
    kernel = draw(st.lists(small, min_size=spatial, max_size=spatial))
    auto_pad = draw(st.sampled_from(AUTO_PADS))
    # onnxruntime has no dilated Conv with SAME padding
    dilation = st.integers(1, 1 if auto_pad.startswith("SAME") else 2)
    dilations = draw(st.lists(dilation, min_size=spatial, max_size=spatial))
    strides = draw(st.lists(small, min_size=spatial, max_size=spatial))
    reach = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    pads = [0] * (2 * spatial)
    if auto_pad == "NOTSET":
        pads = [draw(st.integers(0, r - 1)) for r in reach + reach]
    top = 5 if spatial == 3 else 9
    sizes = [draw(st.integers(r, max(r, top))) for r in reach]
    return {
        "spatial": spatial,
        "groups": groups,
        "in_per_group": draw(st.integers(1, 2)),
        "out_per_group": draw(st.integers(1, 2)),
        "kernel": kernel,
        "dilations": dilations,
        "strides": strides,
        "auto_pad": auto_pad,
        "pads": pads,
        "sizes": sizes,
        "batch": draw(st.integers(1, 2)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _conv_model(case: dict, weight: np.ndarray) -> onnx.ModelProto:
    attributes = {
        "group": case["groups"],
        "strides": case["strides"],
        "dilations": case["dilations"],
        "auto_pad": case["auto_pad"],
    }
    if case["auto_pad"] == "NOTSET":
        attributes["pads"] = case["pads"]
    channels = case["groups"] * case["in_per_group"]
    return models.make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attributes)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, *case["sizes"]])],
        [_any_shape("y", 2 + case["spatial"])],
        [numpy_helper.from_array(weight, "w")],
    )


@BOUNDED
@given(conv_cases())
def test_projected_conv_through_patches_equals_onnxruntime(case):
    """`W' x` over conv_windows' patches equals onnxruntime's Conv with `W' = W P^T`, for
    random pads, strides, dilations, groups, auto_pad and 1-D/2-D/3-D inputs."""
    rng = np.random.default_rng(case["seed"])
    groups, out_per_group = case["groups"], case["out_per_group"]
    weight_shape = (groups * out_per_group, case["in_per_group"], *case["kernel"])
    model = _conv_model(case, rng.normal(size=weight_shape).astype(np.float32))
    (layer,) = scan_layers(model).layers
    projection = rng.normal(size=(groups, layer.input_size, layer.input_size))
    rewritten, _, _ = rewrite_model(
        model, (layer,), by_matrix({layer.statistic_key: projection}), {}
    )
    projected = numpy_helper.to_array(rewritten.graph.initializer[0]).astype(np.float64)
    x = rng.normal(size=(case["batch"], groups * case["in_per_group"], *case["sizes"]))
    x = x.astype(np.float32).astype(np.float64)

    got = run_model(rewritten, x.astype(np.float32))
    expected = _apply(x, projected, layer)
    assert got.shape == expected.shape
    assert np.all(np.abs(got - expected) <= _float32_tolerance(x, projected, layer, 0.0))


@BOUNDED
@given(conv_cases(), st.sampled_from([0, 3]), st.sampled_from([gram.FLOAT32_RUN_VECTORS, 1]))
def test_gram_of_conv_patches_equals_the_windows_reference(case, budget, run_limit):
    """The accumulated Gram matrices of a conv's patches, all of them or `budget` per
    class drawn as documented, equal float64 sums over conv_windows' patches (checked
    against onnxruntime's Conv above), over two batches of a two-class set: in one float32
    run, and (a run limit of 1 vector) added into float64 batch by batch."""
    rng = np.random.default_rng(case["seed"])
    groups, per_group = case["groups"], case["in_per_group"]
    weight_shape = (groups * case["out_per_group"], per_group, *case["kernel"])
    model = _conv_model(case, rng.normal(size=weight_shape).astype(np.float32))
    (layer,) = scan_layers(model).layers
    x = rng.normal(size=(3, groups * per_group, *case["sizes"])).astype(np.float32)
    labels = np.array([1, 0, 1])
    seed = (7, 0)
    accumulator = GramAccumulator(layer, labels, budget, seed)
    with mock.patch.object(gram, "FLOAT32_RUN_VECTORS", run_limit):
        accumulator.add(x[:2], 0)
        assert (accumulator.float32_run is None) == (run_limit == 1)
        accumulator.add(x[2:], 2)

    windows = conv_windows(x.astype(np.float64), layer.geometry)
    spatial = len(layer.geometry.kernel)
    patches = np.moveaxis(windows, 1, 1 + spatial)  # [N, *out, C, *kernel]
    positions = math.prod(patches.shape[1 : 1 + spatial])
    patches = patches.reshape(len(x), positions, groups, layer.input_size)
    picked = []
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        flat = np.arange(len(members) * positions)
        if budget and budget < len(flat):
            draw = np.random.default_rng([*seed, label])
            flat = np.sort(draw.choice(len(flat), size=budget, replace=False))
        member, position = np.divmod(flat, positions)
        picked.append(patches[members[member], position])
    rows = np.concatenate(picked)  # [n, groups, d]
    expected = np.einsum("ngi,ngj->gij", rows, rows)
    difference = np.abs(accumulator.gram - expected).max()
    assert difference <= 1e-5 * max(1.0, np.abs(expected).max())
    assert accumulator.vectors == len(rows)


# --- orientation rules of the rewrite --------------------------------------------------


@st.composite
def layer_cases(draw):
    """One projectable layer with its stored weight's type and the chain it passes through."""
    op = draw(st.sampled_from(["MatMul", "Gemm", "GemmTransB", "Conv1d", "Conv2d"]))
    stored = draw(st.sampled_from(sorted(STORED_TYPES)))
    return {
        "op": op,
        "stored": stored,
        "cast": stored != "float32" or draw(st.booleans()),
        # an FC weight can also be stored transposed, or flat and reshaped
        "chain": "plain"
        if op.startswith("Conv")
        else draw(st.sampled_from(["plain", "T", "flat"])),
        "d": draw(st.integers(1, 6)),
        "out": draw(st.integers(1, 5)),
        "groups": draw(st.integers(1, 2)) if op.startswith("Conv") else 1,
        "tokens": draw(st.booleans()) and op == "MatMul",  # a 3-D input [N, T, d]
        "seed": draw(st.integers(0, 2**16)),
    }


def _layer_model(case: dict) -> tuple[onnx.ModelProto, np.ndarray]:
    """The one-layer model and a batch of its inputs."""
    rng = np.random.default_rng(case["seed"])
    d, groups = case["d"], case["groups"]
    out = case["out"] * groups
    nodes, initializers = [], []
    if case["op"].startswith("Conv"):
        kernel = (3,) * int(case["op"][-2])
        shape = (out, d, *kernel)
        x = rng.normal(size=(4, groups * d, *(5,) * len(kernel)))
    else:
        shape = (out, d) if case["op"] == "GemmTransB" else (d, out)
        x = rng.normal(size=(4, 3, d) if case["tokens"] else (4, d))
    weight = rng.normal(size=shape)
    stored_shape = {"plain": shape, "T": shape[::-1], "flat": (math.prod(shape),)}[case["chain"]]
    stored_value = weight.T if case["chain"] == "T" else weight
    dtype = STORED_TYPES[case["stored"]]
    initializers.append(
        numpy_helper.from_array(stored_value.reshape(stored_shape).astype(dtype), "w_stored")
    )
    current = "w_stored"
    if case["cast"]:
        nodes.append(helper.make_node("Cast", [current], ["w_cast"], name="cast", to=1))
        current = "w_cast"
    if case["chain"] == "T":
        nodes.append(helper.make_node("Transpose", [current], ["w_t"], name="transpose"))
        current = "w_t"
    elif case["chain"] == "flat":
        initializers.append(numpy_helper.from_array(np.array(shape, np.int64), "w_shape"))
        nodes.append(helper.make_node("Reshape", [current, "w_shape"], ["w_r"], name="reshape"))
        current = "w_r"
    op, attributes = case["op"], {}
    if op == "GemmTransB":
        op, attributes = "Gemm", {"transB": 1}
    elif op.startswith("Conv"):
        op, attributes = "Conv", {"group": groups, "pads": [1] * 2 * (len(shape) - 2)}
    nodes.append(helper.make_node(op, ["x", current], ["y"], name="layer", **attributes))
    model = models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x.shape[1:]])],
        [_any_shape("y", x.ndim)],
        initializers,
    )
    return model, x.astype(np.float32)


@BOUNDED
@given(layer_cases())
def test_identity_projection_changes_no_bit_of_any_weight(case):
    """`P = I` through any chain and stored type writes back the very same bytes."""
    model, _ = _layer_model(case)
    (layer,) = scan_layers(model).layers
    identity = np.stack([np.eye(layer.input_size)] * layer.groups)
    rewritten, copies, _ = rewrite_model(
        model, (layer,), by_matrix({layer.statistic_key: identity}), {}
    )
    assert copies == []
    assert [t.SerializeToString() for t in rewritten.graph.initializer] == [
        t.SerializeToString() for t in model.graph.initializer
    ]


@BOUNDED
@given(layer_cases())
def test_projected_layer_equals_the_original_on_transformed_inputs(case):
    """With a random `P` the rewritten layer computes what the original computes on
    `P^T`-transformed input vectors (`x P` for row vectors; patches for a conv), to the
    rounding of the stored type; the stored type itself is kept."""
    model, x = _layer_model(case)
    (layer,) = scan_layers(model).layers
    rng = np.random.default_rng(case["seed"] + 1)
    projection = rng.normal(size=(layer.groups, layer.input_size, layer.input_size)) / math.sqrt(
        layer.input_size
    )
    rewritten, _, _ = rewrite_model(
        model, (layer,), by_matrix({layer.statistic_key: projection}), {}
    )
    stored = numpy_helper.to_array(rewritten.graph.initializer[0])
    assert stored.dtype == np.dtype(STORED_TYPES[case["stored"]])

    original = _as_the_layer_sees_it(model.graph.initializer[0], case, layer)
    projected = _as_the_layer_sees_it(rewritten.graph.initializer[0], case, layer)
    x64 = x.astype(np.float64)
    got = run_model(rewritten, x)
    expected = _apply(x64, original, layer, transform=projection)
    eps = _eps(STORED_TYPES[case["stored"]])
    assert np.all(np.abs(got - expected) <= _float32_tolerance(x64, projected, layer, eps))


def _as_the_layer_sees_it(stored: onnx.TensorProto, case: dict, layer) -> np.ndarray:
    """A stored weight in float64 after the case's chain (Transpose or Reshape)."""
    value = numpy_helper.to_array(stored).astype(np.float64)
    if case["chain"] == "T":
        return value.T
    return value.reshape(layer.weight_shape)


# --- sample loaders on random folder trees and files -----------------------------------

SAMPLE_KINDS = ("png", "npy")
OTHER_KINDS = ("readme", "ds_store", "hidden_png", "subfolder")
# What can be wrong with a tree, or with a .npz, each drawn on its own (often none).
TREE_DEFECTS = ("no_class_folder", "class_without_samples", "corrupt_png")
NPZ_DEFECTS = (
    "no_x", "no_y", "nan", "wrong_shape", "complex", "float_labels", "negative_label",
    "lengths_differ", "object_array", "not_a_zip", "renamed_npy",
)  # fmt: skip


@st.composite
def folder_trees(draw):
    """Class folders (numbered or named) of images and arrays mixed with other entries, a
    hidden folder, files at the top, and at most one defect."""
    numbered = draw(st.booleans())
    names = st.integers(0, 12).map(str) if numbered else st.sampled_from(["cat", "dog", "owl"])
    tree = {
        name: draw(st.lists(st.sampled_from(SAMPLE_KINDS), min_size=1, max_size=3))
        + draw(st.lists(st.sampled_from(OTHER_KINDS), max_size=2))
        for name in draw(st.lists(names, unique=True, min_size=1, max_size=4))
    }
    if draw(st.booleans()):
        tree[".cache"] = ["png", "readme"]
    top = draw(st.lists(st.sampled_from(["readme", "ds_store"]), max_size=2, unique=True))
    defects = draw(st.sets(st.sampled_from(TREE_DEFECTS), max_size=1))
    if "no_class_folder" in defects:
        tree = {name: kinds for name, kinds in tree.items() if name.startswith(".")}
    if "class_without_samples" in defects:
        tree["99" if numbered else "yak"] = ["readme"]
    if "corrupt_png" in defects:
        tree[next(iter(tree))].append("corrupt_png")
    return tree, top, defects, draw(st.integers(0, 2**16))


def _write_entry(folder: Path, kind: str, index: int, rng) -> np.ndarray | None:
    """One entry; returns the model input it must load as, for a sample file."""
    if kind == "png":
        pixels = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
        return pixels[None].astype(np.float32) / np.float32(255)
    if kind == "npy":
        array = rng.normal(size=SAMPLE_SHAPE).astype(np.float32)
        np.save(folder / f"{index}.npy", array)
        return array
    names = {
        "readme": f"README{index}",
        "ds_store": f".DS_Store{index}",
        "hidden_png": f"._{index}.png",
        "corrupt_png": f"{index}.png",
    }
    if kind == "subfolder":
        (folder / f"nested{index}").mkdir()
    else:
        (folder / names[kind]).write_bytes(rng.bytes(40))
    return None


@BOUNDED
@given(folder_trees())
def test_folder_loader_counts_and_loads_what_a_tree_holds(tree_spec):
    """Sample files load with their folder's label; everything else is skipped and counted;
    a tree without a usable class folder, or with a corrupt image, is an InputError."""
    tree, top, defects, seed = tree_spec
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        written, skipped = {}, len(top)
        for folder_name, kinds in tree.items():
            (root / folder_name).mkdir()
            for index, kind in enumerate(kinds):
                value = _write_entry(root / folder_name, kind, index, rng)
                if folder_name.startswith("."):
                    continue
                if kind in SAMPLE_KINDS:
                    written[root / folder_name / f"{index}.{kind}"] = value
                elif kind != "corrupt_png":
                    skipped += 1
        for kind in top:
            _write_entry(root, kind, 0, rng)
        if defects & {"no_class_folder", "class_without_samples"}:
            with pytest.raises(InputError, match=re.escape(name)):
                open_samples(root, SIGNATURE, Preprocessing())
            return
        samples = open_samples(root, SIGNATURE, Preprocessing())
        assert samples.skipped_files == skipped
        visible = sorted(n for n in tree if not n.startswith("."))
        numbered = all(n.isdigit() for n in visible)
        for path, label in zip(samples.files, samples.labels):
            folder = path.parent.name
            assert label == (int(folder) if numbered else visible.index(folder))
        everything = np.arange(len(samples))
        if "corrupt_png" in defects:
            with pytest.raises(InputError, match="not a readable"):
                samples.load(everything)
            return
        assert sorted(samples.files) == sorted(written)
        batch = samples.load(everything)
        expected = np.stack([written[path] for path in samples.files])
        np.testing.assert_allclose(batch, expected, rtol=1e-6, atol=0)


@st.composite
def npz_files(draw):
    """A `.npz` of x `[N, 1, 28, 28]` and y `[N]`, with any set of defects (often none)."""
    count = draw(st.integers(1, 5))
    defects = draw(st.sets(st.sampled_from(NPZ_DEFECTS), max_size=2))
    x_type = draw(st.sampled_from(["float32", "float64", "uint8", "float16"]))
    return count, x_type, defects, draw(st.integers(0, 2**16))


def _write_npz(path: Path, count: int, x_type: str, defects: set, rng) -> None:
    if "not_a_zip" in defects:
        path.write_bytes(rng.bytes(64))
        return
    x = (rng.random(size=(count, *SAMPLE_SHAPE)) * 200).astype(x_type)
    y = rng.integers(0, 10, size=count)
    if "nan" in defects:
        x = x.astype(np.float32)
        x[0, 0, 0, 0] = np.nan
    if "wrong_shape" in defects:
        x = x.reshape(count, 28, 28)
    if "complex" in defects:
        x = x.astype(np.complex64)
    if "object_array" in defects:
        x = np.array([None] * count, dtype=object)
    if "float_labels" in defects:
        y = y.astype(np.float32)
    if "negative_label" in defects:
        y[0] = -1
    if "lengths_differ" in defects:
        y = np.append(y, 0)
    arrays = {"x": x, "y": y}
    for name in ("x", "y"):
        if f"no_{name}" in defects:
            del arrays[name]
    if "renamed_npy" in defects:
        np.save(path.with_suffix(".npy"), x, allow_pickle=True)
        path.with_suffix(".npy").rename(path)
        return
    np.savez(path, **arrays)


@BOUNDED
@given(npz_files())
def test_npz_loader_loads_sound_files_and_refuses_every_defect(spec):
    """A sound `.npz` loads its labels and inputs unchanged; any defect is an InputError
    naming the file, and never anything else (an object array is never unpickled)."""
    count, x_type, defects, seed = spec
    with tempfile.TemporaryDirectory() as name:
        path = Path(name) / "samples.npz"
        _write_npz(path, count, x_type, defects, np.random.default_rng(seed))
        if defects:
            with pytest.raises(InputError, match=re.escape(str(path))):
                open_samples(path, SIGNATURE, Preprocessing())
            return
        samples = open_samples(path, SIGNATURE, Preprocessing())
        with np.load(path) as archive:
            assert np.array_equal(samples.labels, archive["y"])
            expected = archive["x"].astype(np.float32)
        np.testing.assert_array_equal(samples.load(np.arange(count)), expected)
