"""Untrusted model files fed to the CLI, and models that only look unusual.

Truncated files, models the ONNX checker fails, models without a layer to project or
with an interface or operators onnxruntime cannot serve, weights that are NaN, overflow
or have an undefined type (cases the model fuzzer found), and models or external data
over `--max-model-bytes`: each refusal is checked from four sides, the documented exit
code, one stderr line that names the file at fault, every file of the run's folder (the
input model included) with its bytes unchanged, and nothing new left behind. Weights
stored as float16, bfloat16 or float64 behind a Cast are no fault: they are projected
and stored back in their own type. Bad models test_cli.py already covers (missing,
random, empty or folder models, --forget-class 12) are not repeated here.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import models
from tests.helpers import (
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    MODEL,
    PROGRAM,
    SAMPLES,
    external_model,
    fixture_model,
    forget_args,
    run_cli,
    save_proto,
    setup_id,
)

pytestmark = pytest.mark.usefixtures("one_blas_thread")


# --- untrusted models ------------------------------------------------------------------


def _truncated(tmp):
    (tmp / "cut.onnx").write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    return forget_args("cut.onnx"), EXIT_USAGE, ("cut.onnx", "truncated")


def _fails_the_checker(tmp):
    proto = fixture_model()
    proto.graph.node[2].input[0] = "nowhere"
    save_proto(proto, tmp, "bad.onnx")
    return forget_args("bad.onnx"), EXIT_UNSUPPORTED, ("bad.onnx", "ONNX checker")


def _no_projectable_layer(tmp):
    softmax = models.make_model(
        [helper.make_node("Softmax", ["x"], ["y"], axis=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [],
    )
    save_proto(softmax, tmp, "soft.onnx")
    return forget_args("soft.onnx"), EXIT_UNSUPPORTED, ("soft.onnx", "no projectable")


def _two_data_inputs(tmp):
    proto = fixture_model()
    proto.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 3]))
    save_proto(proto, tmp, "two.onnx")
    return forget_args("two.onnx"), EXIT_UNSUPPORTED, ("two.onnx", "exactly one data input")


def _no_scores_output(tmp):
    proto = fixture_model()
    proto.graph.node.append(helper.make_node("ArgMax", ["logits"], ["label"], axis=1))
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N", 1]))
    save_proto(proto, tmp, "argmax.onnx")
    return forget_args("argmax.onnx"), EXIT_UNSUPPORTED, ("argmax.onnx", "--output NAME")


def _output_name_of_a_feature_map(tmp):
    proto = fixture_model()
    feature_map = helper.make_tensor_value_info(
        "/2/Relu_output_0", TensorProto.FLOAT, ["N", 16, 28, 28]
    )
    proto.graph.output.append(feature_map)
    save_proto(proto, tmp, "maps.onnx")
    args = forget_args("maps.onnx", SAMPLES, "--output", "/2/Relu_output_0")
    return args, EXIT_UNSUPPORTED, ("maps.onnx", "not float [N, classes] scores")


def _opset_onnxruntime_cannot_run(tmp):
    proto = fixture_model()
    proto.opset_import[0].version = onnx.defs.onnx_opset_version()  # past onnxruntime's
    save_proto(proto, tmp, "future.onnx")
    return (
        forget_args("future.onnx"),
        EXIT_UNSUPPORTED,
        ("future.onnx", "CPUExecutionProvider", "cannot load"),
    )


def _op_onnxruntime_lacks(tmp):
    proto = fixture_model()
    proto.graph.node[1].op_type, proto.graph.node[1].domain = "Swish", "com.example"
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    save_proto(proto, tmp, "custom.onnx")
    return (
        forget_args("custom.onnx"),
        EXIT_UNSUPPORTED,
        ("custom.onnx", "CPUExecutionProvider", "Swish"),
    )


def _fuzz_undefined_data_type(tmp):
    """benchmarks/fuzz_models.py seed 1 case 87: a data type the checker lets through."""
    proto = fixture_model()
    proto.graph.initializer[2].data_type = 99
    save_proto(proto, tmp, "type99.onnx")
    return forget_args("type99.onnx"), EXIT_UNSUPPORTED, ("type99.onnx", "data type 99")


def _fuzz_more_data_than_shape(tmp):
    """Fuzz seed 1 case 155: onnxruntime refuses what the checker passes, and its own log
    line must not reach stderr."""
    proto = fixture_model()
    bias = next(t for t in proto.graph.initializer if t.name == "onnx::Conv_46")
    del bias.dims[:]
    save_proto(proto, tmp, "scalar.onnx")
    return forget_args("scalar.onnx"), EXIT_UNSUPPORTED, ("scalar.onnx", "CPUExecutionProvider")


def _fuzz_nan_weights(tmp):
    """Fuzz seed 1 case 285: random weight bits, NaN activations, no decomposition."""
    proto = fixture_model()
    weight = proto.graph.initializer[4]  # the first conv's
    weight.raw_data = np.full(tuple(weight.dims), np.nan, np.float32).tobytes()
    save_proto(proto, tmp, "nan.onnx")
    return forget_args("nan.onnx"), EXIT_UNSUPPORTED, ("NaN or Inf",)


def _fuzz_overflowing_head(tmp):
    """Fuzz seed 2 case 84: weights so large the head's logits overflow; the refit of the
    head must refuse them, and numpy's warnings must not reach stderr."""
    proto = fixture_model()
    head = next(t for t in proto.graph.initializer if t.name == "14.weight")
    weight = numpy_helper.to_array(head).copy()
    weight[0, 0] = np.finfo(np.float32).max
    head.CopyFrom(numpy_helper.from_array(weight, head.name))
    save_proto(proto, tmp, "huge.onnx")
    return forget_args("huge.onnx"), EXIT_UNSUPPORTED, ("NaN or Inf",)


def _over_the_model_limit(tmp):
    args = forget_args(MODEL.name, SAMPLES, "--max-model-bytes", "100000")
    return args, EXIT_USAGE, (MODEL.name, "--max-model-bytes")


def _external_data_over_the_model_limit(tmp):
    path, _ = external_model(tmp / "models")
    limit = str(path.stat().st_size + 1000)  # the .onnx alone fits, its weights do not
    args = forget_args("models/model.onnx", SAMPLES, "--max-model-bytes", limit)
    return args, EXIT_USAGE, ("models/model.onnx", "external data", "--max-model-bytes")


def _layers_over_the_model_limit(tmp):
    args = ["layers", MODEL.name, "--max-model-bytes", "1000"]
    return args, EXIT_USAGE, (MODEL.name, "--max-model-bytes")


@pytest.mark.parametrize(
    "setup",
    [
        _truncated,
        _fails_the_checker,
        _no_projectable_layer,
        _two_data_inputs,
        _no_scores_output,
        _output_name_of_a_feature_map,
        _opset_onnxruntime_cannot_run,
        _op_onnxruntime_lacks,
        _over_the_model_limit,
        _external_data_over_the_model_limit,
        _layers_over_the_model_limit,
        _fuzz_undefined_data_type,
        _fuzz_more_data_than_shape,
        _fuzz_nan_weights,
        _fuzz_overflowing_head,
    ],
    ids=setup_id,
)
def test_untrusted_model_is_refused(refusals, setup):
    """Corrupt, unsupported or oversized models: exit 2 or 3 with the reason."""
    refusals[setup].check()


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    """With --debug the traceback comes first, then the same line and exit code."""
    args, code, _ = _truncated(tmp_path)
    process = run_cli(*args, "--debug", cwd=tmp_path)
    assert process.returncode == code
    assert "Traceback" in process.stderr
    assert process.stderr.splitlines()[-1].startswith(f"{PROGRAM}: error: cut.onnx")


# --- weights of other float types ------------------------------------------------------


def _cast_model(dtype) -> onnx.ModelProto:
    """The mixed test model with every weight stored as `dtype` behind a Cast to float."""
    weights = models.mixed_weights()
    nodes = models.mixed_model(weights).graph.node
    casts, initializers = [], []
    for name, value in weights.items():
        initializers.append(numpy_helper.from_array(value.astype(dtype), name + ".stored"))
        casts.append(
            helper.make_node("Cast", [name + ".stored"], [name], name="cast_" + name, to=1)
        )
    initializers.append(numpy_helper.from_array(np.array([0, 6, 20], np.int64), "shape"))
    return models.make_model(
        casts + list(nodes),
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *models.MIXED_INPUT])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", models.MIXED_CLASSES])],
        initializers,
    )


def _mixed_samples(path: Path, count: int = 24) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, *models.MIXED_INPUT)).astype(np.float32)
    np.savez(path, x=x, y=np.arange(count) % models.MIXED_CLASSES)
    return path


@pytest.mark.parametrize(
    "dtype", [np.float16, ml_dtypes.bfloat16, np.float64], ids=["float16", "bfloat16", "float64"]
)
def test_weights_behind_casts_keep_their_stored_type(tmp_path, dtype):
    """float16 / bfloat16 / float64 weights Cast to float: projected, stored back as they
    were, and the projection moved them."""
    original = _cast_model(dtype)
    save_proto(original, tmp_path, "cast.onnx")
    _mixed_samples(tmp_path / "samples.npz")
    process = run_cli(
        "cast.onnx", "--forget-class", "1", "--samples", "samples.npz", "-o", "out.onnx", "-q",
        "--depth", "all", cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    before = _initializers(original)
    after = _initializers(onnx.load(tmp_path / "out.onnx"))
    for name in models.mixed_weights():
        stored = name + ".stored"
        assert after[stored].dtype == np.dtype(dtype), name
        moved = not np.array_equal(after[stored], before[stored])
        assert moved == name.endswith("_w"), name  # weights projected, biases as they were


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
