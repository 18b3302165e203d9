"""The command line end to end, in a subprocess, the way a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnx_forget
from tests.helpers import (
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    FAST,
    HELD_OUT,
    MODEL,
    PROGRAM,
    SAMPLES,
    forget_args,
    listing,
    png_folder,
    run_cli,
    sha256,
)

FORGOTTEN = 3
REPORT_KEYS = {
    "format",
    "model",
    "output",
    "forgotten_classes",
    "layers",
    "samples",
    "accuracy",
    "timings_s",
}
METADATA_KEYS = {
    "onnx_forget.forgotten_classes",
    "onnx_forget.source_sha256",
    "onnx_forget.alpha_r",
    "onnx_forget.alpha_f",
    "onnx_forget.samples",
    "onnx_forget.version",
}


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def _io(session: ort.InferenceSession) -> list[tuple]:
    """Name, shape and element type of every input, then every output."""
    return [(v.name, v.shape, v.type) for v in (*session.get_inputs(), *session.get_outputs())]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _assert_refused(process, code: int, before: set[str], after: set[str]) -> None:
    """Exit `code`, one `onnx-forget: error:` line on stderr, nothing else, no new files."""
    assert process.returncode == code, process.stderr
    assert "Traceback" not in process.stderr
    lines = process.stderr.splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith(f"{PROGRAM}: error: "), process.stderr
    assert process.stdout == ""
    assert after == before


# --- one full run at default sample counts, checked from several sides ----------------


@dataclass
class FullRun:
    folder: Path
    model: Path
    model_sha256: str
    process: subprocess.CompletedProcess

    @property
    def output(self) -> Path:
        return self.folder / "out.onnx"

    def report(self) -> dict:
        return json.loads((self.folder / "r.json").read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> FullRun:
    """Forget class 3 with `-o out.onnx --report r.json --eval-samples` on held-out digits."""
    folder = tmp_path_factory.mktemp("full_run")
    model = Path(shutil.copy(MODEL, folder / MODEL.name))
    digest = sha256(model)
    process = run_cli(
        model.name,
        "--forget-class",
        FORGOTTEN,
        "--samples",
        SAMPLES,
        "-o",
        "out.onnx",
        "--report",
        "r.json",
        "--eval-samples",
        HELD_OUT,
        cwd=folder,
    )
    return FullRun(folder, model, digest, process)


def test_forget_writes_a_model_with_the_original_inputs_and_outputs(full_run):
    """Exit 0; out.onnx loads and runs in onnxruntime with the original names, shapes, types."""
    assert full_run.process.returncode == 0, full_run.process.stderr
    new, original = _session(full_run.output), _session(MODEL)
    assert _io(new) == _io(original)
    x = np.load(HELD_OUT)["x"][:4]
    (scores,) = new.run(None, {"input": x})
    assert scores.shape == (4, 10) and scores.dtype == np.float32


def test_forget_leaves_the_input_model_byte_identical(full_run):
    """The input file's SHA-256 is the same after the run as before it."""
    assert full_run.process.returncode == 0, full_run.process.stderr
    assert sha256(full_run.model) == full_run.model_sha256 == sha256(MODEL)


def test_forget_records_provenance_in_the_model_metadata(full_run):
    """Metadata names the forgotten class, the source's SHA-256 and the run's settings."""
    metadata = _metadata(full_run.output)
    assert METADATA_KEYS <= metadata.keys()
    assert metadata["onnx_forget.forgotten_classes"] == str(FORGOTTEN)
    assert metadata["onnx_forget.source_sha256"] == full_run.model_sha256
    assert metadata["onnx_forget.version"] == onnx_forget.__version__
    assert all(metadata[key] for key in METADATA_KEYS)


def test_report_json_has_the_documented_keys(full_run):
    """`--report` writes parseable JSON naming the model, output, class and 5 layers."""
    report = full_run.report()
    assert REPORT_KEYS <= report.keys()
    assert report["forgotten_classes"] == [FORGOTTEN]
    assert Path(report["output"]).name == "out.onnx"
    assert Path(report["model"]).name == MODEL.name
    assert len(report["layers"]) == 5
    assert report["samples"]["retain"] == 900 and report["samples"]["forget"] == 100
    assert {"samples", "eval"} <= report["accuracy"].keys()


def test_forgotten_class_accuracy_collapses(full_run):
    """The forgotten class goes from >90 % to <20 % on the samples used and on held-out."""
    accuracy = full_run.report()["accuracy"]
    for name in ("samples", "eval"):
        assert accuracy[name]["before"]["forget"] > 90
        assert accuracy[name]["after"]["forget"] < 20
        assert accuracy[name]["after"]["retain"] > 80


# --- output paths ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "classes",
    [("--forget-class", "3", "--forget-class", "5"), ("--forget-class", "3,5")],
    ids=["repeated", "comma"],
)
def test_default_output_is_named_after_the_classes(cli, model, tmp_path, classes):
    """Without -o the model goes beside the input as `<stem>.forget-3-5.onnx`."""
    process = cli(model.name, *classes, "--samples", SAMPLES, *FAST, "-q")
    assert process.returncode == 0, process.stderr
    output = tmp_path / "mnist_cnn.forget-3-5.onnx"
    assert listing(tmp_path) == {model.name, output.name}
    assert _metadata(output)["onnx_forget.forgotten_classes"] == "3,5"


@pytest.mark.parametrize("explicit", [True, False], ids=["with-o", "default-name"])
def test_existing_output_is_not_replaced_without_force(cli, model, tmp_path, explicit):
    """An existing output file: exit 2, 'already exists', the file keeps its bytes."""
    target = tmp_path / ("out.onnx" if explicit else "mnist_cnn.forget-3.onnx")
    target.write_bytes(b"precious")
    before = listing(tmp_path)
    where = ("-o", target.name) if explicit else ()
    process = cli(model.name, "--forget-class", "3", "--samples", SAMPLES, *FAST, *where)
    _assert_refused(process, EXIT_USAGE, before, listing(tmp_path))
    assert "already exists" in process.stderr
    assert target.read_bytes() == b"precious"


def test_force_replaces_an_existing_output(cli, model, tmp_path):
    """With --force the existing file is replaced by the forgetting model."""
    target = tmp_path / "out.onnx"
    target.write_bytes(b"precious")
    process = cli(model.name, "--forget-class", "3", "--samples", SAMPLES, *FAST, "-o", "out.onnx")
    assert process.returncode == 2, "sanity: refused without --force"
    process = cli(
        model.name, "--forget-class", "3", "--samples", SAMPLES, *FAST, "-o", "out.onnx", "--force"
    )
    assert process.returncode == 0, process.stderr
    assert _metadata(target)["onnx_forget.forgotten_classes"] == "3"
    assert listing(tmp_path) == {model.name, target.name}


@pytest.mark.parametrize("spelling", ["relative", "absolute", "relative-force"])
def test_output_onto_the_input_model_is_refused(cli, model, tmp_path, spelling):
    """`-o` naming the input model itself (even with --force): exit 2, input unchanged."""
    target = str(model) if spelling == "absolute" else model.name
    force = ("--force",) if spelling.endswith("force") else ()
    digest, before = sha256(model), listing(tmp_path)
    process = cli(model.name, "--forget-class", "3", "--samples", SAMPLES, "-o", target, *force)
    _assert_refused(process, EXIT_USAGE, before, listing(tmp_path))
    assert sha256(model) == digest


# --- bad inputs: one line, a documented exit code, nothing written ---------------------


def _missing_model(tmp, model):
    return ["absent.onnx", "--forget-class", "3", "--samples", SAMPLES]


def _random_bytes_model(tmp, model):
    (tmp / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    return ["random.onnx", "--forget-class", "3", "--samples", SAMPLES]


def _empty_model(tmp, model):
    (tmp / "empty.onnx").write_bytes(b"")
    return ["empty.onnx", "--forget-class", "3", "--samples", SAMPLES]


def _directory_model(tmp, model):
    (tmp / "folder.onnx").mkdir()
    return ["folder.onnx", "--forget-class", "3", "--samples", SAMPLES]


def _class_beyond_the_model(tmp, model):
    return [model.name, "--forget-class", "12", "--samples", SAMPLES]


def _missing_samples(tmp, model):
    return [model.name, "--forget-class", "3", "--samples", "absent"]


def _empty_samples_folder(tmp, model):
    (tmp / "samples").mkdir()
    return [model.name, "--forget-class", "3", "--samples", "samples"]


def _class_folder_without_samples(tmp, model):
    png_folder(tmp / "samples", classes=(3,))
    (tmp / "samples" / "4").mkdir()
    return [model.name, "--forget-class", "3", "--samples", "samples"]


def _npz_without_y(tmp, model):
    np.savez(tmp / "x_only.npz", x=np.zeros((4, 1, 28, 28), np.float32))
    return [model.name, "--forget-class", "3", "--samples", "x_only.npz"]


def _npz_lengths_differ(tmp, model):
    np.savez(
        tmp / "uneven.npz",
        x=np.zeros((4, 1, 28, 28), np.float32),
        y=np.array([3, 3, 4], np.int64),
    )
    return [model.name, "--forget-class", "3", "--samples", "uneven.npz"]


def _unknown_output_name(tmp, model):
    return [model.name, "--forget-class", "3", "--samples", SAMPLES, "--output", "nonexistent_name"]


def _npy_of_the_wrong_shape(tmp, model):
    png_folder(tmp / "samples")
    np.save(tmp / "samples" / "3" / "wide.npy", np.zeros((1, 28, 29), np.float32))
    return [model.name, "--forget-class", "3", "--samples", "samples", *FAST]


def _corrupt_png(tmp, model):
    png_folder(tmp / "samples")
    (tmp / "samples" / "3" / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(512))
    return [model.name, "--forget-class", "3", "--samples", "samples", *FAST]


def _forget_every_class_present(tmp, model):
    png_folder(tmp / "samples", classes=(3,))
    return [model.name, "--forget-class", "3", "--samples", "samples", *FAST]


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        (_missing_model, EXIT_USAGE),
        (_random_bytes_model, EXIT_USAGE),
        (_empty_model, EXIT_USAGE),
        (_directory_model, EXIT_USAGE),
        (_class_beyond_the_model, EXIT_USAGE),
        (_missing_samples, EXIT_USAGE),
        (_empty_samples_folder, EXIT_USAGE),
        (_class_folder_without_samples, EXIT_USAGE),
        (_npz_without_y, EXIT_USAGE),
        (_npz_lengths_differ, EXIT_USAGE),
        (_unknown_output_name, EXIT_UNSUPPORTED),
        pytest.param(_npy_of_the_wrong_shape, EXIT_USAGE),
        pytest.param(_corrupt_png, EXIT_USAGE),
        (_forget_every_class_present, EXIT_USAGE),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else str(v),
)
def test_bad_input_is_one_line_and_an_exit_code(cli, model, tmp_path, setup, code):
    """Each bad input exits with its documented code, one stderr line, the input model
    unchanged, no files left."""
    args = setup(tmp_path, model)
    before, digest = listing(tmp_path), sha256(model)
    process = cli(*args)
    _assert_refused(process, code, before, listing(tmp_path))
    assert sha256(model) == digest


def test_report_into_a_missing_folder_is_a_usage_error(cli, model, tmp_path):
    """An unwritable --report path is bad usage (exit 2, one line), not an internal error.

    Run with -q so that only this bug, not the CUDA notice on stderr, makes it fail.
    """
    before = listing(tmp_path)
    args = ("--forget-class", "3", "--samples", SAMPLES, *FAST, "-q", "--report", "no/r.json")
    process = cli(model.name, *args)
    _assert_refused(process, EXIT_USAGE, before, listing(tmp_path))


# --- other commands and flags ----------------------------------------------------------


def _projectable_nodes() -> list[tuple[str, str]]:
    graph = onnx.load(MODEL).graph
    return [(n.name, n.op_type) for n in graph.node if n.op_type in ("Conv", "Gemm")]


def test_layers_prints_the_conv_and_gemm_nodes(cli, model):
    """`layers MODEL` names the 3 Conv and 2 Gemm nodes of the CNN and exits 0."""
    nodes = _projectable_nodes()
    assert sorted(op for _, op in nodes) == ["Conv"] * 3 + ["Gemm"] * 2
    process = cli("layers", model.name)
    assert process.returncode == 0, process.stderr
    rows = process.stdout.splitlines()
    for name, op in nodes:
        assert any(row.split()[:2] == [name, op] for row in rows), (name, process.stdout)
    assert "5 projectable, 0 skipped" in process.stdout


def test_layers_json_lists_five_projected_rows(cli, model):
    """`layers MODEL --json` is parseable JSON with the 5 nodes, each 'projected'."""
    process = cli("layers", model.name, "--json")
    assert process.returncode == 0, process.stderr
    rows = json.loads(process.stdout)
    assert len(rows) == 5
    assert {row["status"] for row in rows} == {"projected"}
    assert sorted((row["node"], row["op"]) for row in rows) == sorted(_projectable_nodes())


def test_version_prints_the_package_version(cli):
    """`--version` exits 0 and prints the installed package's version."""
    process = cli("--version")
    assert process.returncode == 0, process.stderr
    assert onnx_forget.__version__ == version("onnx-forget")
    assert onnx_forget.__version__ in process.stdout


def test_help_exits_zero_and_lists_the_commands(cli):
    """`--help` exits 0 and names the forget and layers commands."""
    process = cli("--help")
    assert process.returncode == 0, process.stderr
    assert "forget" in process.stdout and "layers" in process.stdout


def test_quiet_prints_nothing(cli, model, tmp_path):
    """`-q` writes the model and prints nothing on stdout (nor stderr)."""
    process = cli(model.name, "--forget-class", "3", "--samples", SAMPLES, *FAST, "-q")
    assert process.returncode == 0, process.stderr
    assert process.stdout == ""
    assert process.stderr == ""
    assert (tmp_path / "mnist_cnn.forget-3.onnx").is_file()


def test_non_sample_files_are_skipped_and_counted(cli, model, tmp_path):
    """README and .DS_Store in class folders are skipped and counted in samples.skipped_files."""
    samples = png_folder(tmp_path / "samples", classes=range(10), per_class=10)
    (samples / "0" / "README").write_text("digits\n")
    (samples / "3" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (samples / "7" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    process = cli(
        model.name, "--forget-class", "3", "--samples", "samples", *FAST, "--report", "r.json",
        "--depth", "all",  # a depth search would hold some samples back to validate on
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"]["skipped_files"] == 3
    assert report["samples"]["retain"] == 90 and report["samples"]["forget"] == 10


def test_collect_merge_and_forget_from_statistics(cli, model, tmp_path):
    """The statistics workflow as a pipeline runs it: shards, merge, forget with no samples."""
    for name, classes in (("a", "0,1,2,3,4"), ("b", "5,6,7,8,9")):
        done = cli(
            "collect", model, "--samples", SAMPLES, "--classes", classes, "--per-class", "10",
            "-o", tmp_path / f"{name}.npz", "-q",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    done = cli("merge", tmp_path / "a.npz", tmp_path / "b.npz", "-o", tmp_path / "all.npz",
               "--report", tmp_path / "merge.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "merge.json").read_text())
    assert summary["samples"] == {str(c): 10 for c in range(10)}
    done = cli(model, "--forget-class", "4", "--stats", tmp_path / "all.npz", "-o", "out.onnx")
    assert done.returncode == 0, done.stderr
    assert _metadata(tmp_path / "out.onnx")["onnx_forget.forgotten_classes"] == "4"


def test_evaluate_prints_accuracy_and_agreement(cli, model, tmp_path):
    done = cli(model, "--forget-class", "2", "--samples", SAMPLES, *FAST, "-o", "no2.onnx", "-q")
    assert done.returncode == 0, done.stderr
    done = cli("evaluate", "no2.onnx", "--samples", HELD_OUT, "--reference", model,
               "--report", "eval.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "agreement with the reference" in done.stdout
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["forgotten_classes"] == [2]
    assert evaluation["accuracy"]["forget"] < 20


def test_tune_prints_the_grid_and_marks_the_best(cli, model, tmp_path):
    done = cli(model, "--forget-class", "1", "--samples", SAMPLES, *FAST, "--tune",
               "--alpha-r-grid", "10,100", "--alpha-f-grid", "1,3", "-o", "tuned.onnx")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("<- best") == 1
    assert (tmp_path / "tuned.onnx").is_file()


@pytest.mark.usefixtures("one_blas_thread")
def test_same_inputs_and_seed_give_a_byte_identical_model(tmp_path, model):
    """Two runs with the same inputs and --seed write the same bytes."""
    for name in ("a.onnx", "b.onnx"):
        process = run_cli(*forget_args(model.name), "--seed", "7", "-o", name, "-q", cwd=tmp_path)
        assert process.returncode == 0, process.stderr
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
