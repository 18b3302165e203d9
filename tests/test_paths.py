"""Output paths: no output may be an input, and a run's outputs land together or not at all.

Each clash is run through the CLI as a user would and checked from four sides: exit 2, one
stderr line naming the output, every file of the run's folder byte-identical, nothing new.
An output folder that takes no file is refused the same way, and a link planted where an
output's external data goes is replaced, never written through.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_forget
from onnx_forget import outputs
from onnx_forget.errors import InputError
from onnx_forget.modelio import load_model
from tests.helpers import (
    EXIT_USAGE,
    EXTERNAL,
    FAST,
    FEW,
    FEW_SAMPLES,
    HELD_OUT,
    MODEL,
    SAMPLES,
    SECRET,
    external_model,
    forget_args,
    listing,
    png_folder,
    run_cli,
    run_cli_in_parallel,
    secret_file,
    setup_id,
    sha256,
    snapshot,
)


def _run_folder(folder: Path) -> None:
    """The inputs a clash may name: the model, its external-data twin, a small sample
    folder, held-out samples, statistics files, class names, and links to them."""
    shutil.copy(MODEL, folder / "model.onnx")
    shutil.copytree(EXTERNAL, folder / "external")
    png_folder(folder / "samples")
    shutil.copy(HELD_OUT, folder / "heldout.npz")
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in range(10)))
    (folder / "model-link.onnx").symlink_to("model.onnx")
    os.link(folder / "model.onnx", folder / "model-hard.onnx")
    (folder / "samples-link").symlink_to("samples")


# Each case: the arguments, run in a folder made by `_run_folder` (plus "a.npz" and
# "b.npz", statistics files, when a case names them), and what the error must name.
CLASHES = {
    "report-is-the-model": (
        ["model.onnx", "--forget-class", "3", "--samples", "samples", "-o", "out.onnx",
         "--report", "model.onnx"],
        "model.onnx",
    ),
    "report-is-the-model-even-with-force": (
        ["model.onnx", "--forget-class", "3", "--samples", "samples", "-o", "out.onnx",
         "--report", "model.onnx", "--force"],
        "model.onnx",
    ),
    "output-is-a-symlink-to-the-model": (
        ["model.onnx", "--forget-class", "3", "--samples", "samples", "-o", "model-link.onnx",
         "--force"],
        "model-link.onnx",
    ),
    "output-is-a-hard-link-to-the-model": (
        ["model.onnx", "--forget-class", "3", "--samples", "samples", "-o", "model-hard.onnx",
         "--force"],
        "model-hard.onnx",
    ),
    "output-is-the-external-data": (
        ["external/model.onnx", "--forget-class", "3", "--samples", "samples",
         "-o", "external/model.onnx.data", "--force"],
        "external/model.onnx.data",
    ),
    "report-inside-the-sample-folder": (
        ["model.onnx", "--forget-class", "3", "--samples", "samples", "-o", "out.onnx",
         "--report", "samples-link/report.json"],
        "samples-link/report.json",
    ),
    "report-is-a-sample-file": (
        ["model.onnx", "--forget-class", "3", "--samples", "samples", "-o", "out.onnx",
         "--report", "samples/3/0000.png"],
        "samples/3/0000.png",
    ),
    "report-is-the-eval-samples": (
        ["model.onnx", "--forget-class", "3", "--samples", "samples", "-o", "out.onnx",
         "--eval-samples", "heldout.npz", "--report", "heldout.npz"],
        "heldout.npz",
    ),
    "output-is-the-report": (
        ["model.onnx", "--forget-class", "3", "--samples", "samples", "-o", "out.onnx",
         "--report", "out.onnx"],
        "out.onnx",
    ),
    "output-is-the-statistics-file": (
        ["model.onnx", "--forget-class", "3", "--stats", "a.npz", "-o", "a.npz", "--force"],
        "a.npz",
    ),
    "collect-output-is-the-model": (
        ["collect", "model.onnx", "--samples", "samples", "-o", "model.onnx", "--force"],
        "model.onnx",
    ),
    "collect-output-is-the-class-names": (
        ["collect", "model.onnx", "--samples", "samples", "--class-names", "classes.txt",
         "-o", "classes.txt", "--force"],
        "classes.txt",
    ),
    "merge-output-is-a-part": (
        ["merge", "a.npz", "b.npz", "-o", "./b.npz", "--force"],
        "b.npz",
    ),
    "merge-report-is-a-part": (
        ["merge", "a.npz", "b.npz", "-o", "c.npz", "--report", "a.npz"],
        "a.npz",
    ),
    "evaluate-report-is-the-model": (
        ["evaluate", "model.onnx", "--samples", "heldout.npz", "--report", "model.onnx"],
        "model.onnx",
    ),
    "evaluate-report-is-the-reference": (
        ["evaluate", "model.onnx", "--samples", "heldout.npz", "--reference", "model-link.onnx",
         "--report", "model-hard.onnx"],
        "model-hard.onnx",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def statistics_files(tmp_path_factory) -> tuple[Path, Path]:
    """Two small statistics files of the fixture CNN, collected once."""
    folder = tmp_path_factory.mktemp("statistics")
    digits = np.load(HELD_OUT)
    for name, labels in (("a.npz", (3, 4)), ("b.npz", (3, 5))):
        chosen = np.concatenate([np.flatnonzero(digits["y"] == c)[:3] for c in labels])
        onnx_forget.collect(MODEL, (digits["x"][chosen], digits["y"][chosen])).save(folder / name)
    return folder / "a.npz", folder / "b.npz"


@pytest.fixture(scope="module")
def clashes(tmp_path_factory, statistics_files) -> dict:
    """Every clash, run once each, as many at a time as there are cores."""
    cases = {}
    for name, (args, mentioned) in CLASHES.items():
        folder = tmp_path_factory.mktemp(name)
        _run_folder(folder)
        for statistics in statistics_files:
            shutil.copy(statistics, folder / statistics.name)
        cases[name] = (folder, [*args, *_sample_caps(args[0])], mentioned)
    before = {name: snapshot(folder) for name, (folder, _, _) in cases.items()}
    runs = run_cli_in_parallel((args, folder) for folder, args, _ in cases.values())
    return {
        name: (process, mentioned, before[name], folder)
        for (name, (folder, _, mentioned)), process in zip(cases.items(), runs)
    }


def _sample_caps(command: str) -> tuple[str, ...]:
    """As few samples as the command takes, should a case not be refused."""
    return {"collect": ("--per-class", "5"), "merge": (), "evaluate": ()}.get(command, FEW)


@pytest.mark.parametrize("name", sorted(CLASHES))
def test_an_output_that_is_an_input_is_refused(clashes, name):
    process, mentioned, before, folder = clashes[name]
    assert process.returncode == EXIT_USAGE, process.stderr
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-forget: error: "), process.stderr
    assert mentioned in lines[0], lines[0]
    assert snapshot(folder) == before


def test_a_report_replaces_an_old_report_without_force(tmp_path):
    """Reports are logs: rewritten each run, like `evaluate`'s, with no --force needed."""
    _run_folder(tmp_path)
    (tmp_path / "eval.json").write_text("old")
    process = run_cli(
        "evaluate", "model.onnx", "--samples", "heldout.npz", "--report", "eval.json", "-q",
        cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"]["retain"] > 95


def test_a_failed_report_leaves_no_model(tmp_path, monkeypatch):
    """The report is staged before the model is renamed: failing to write it leaves the
    folder as it was."""
    model = Path(shutil.copy(MODEL, tmp_path / "model.onnx"))
    before = snapshot(tmp_path)

    def full_disk(self, path, write):
        raise InputError(f"{path}: cannot write it (No space left on device)")

    monkeypatch.setattr(outputs.OutputFiles, "add_file", full_disk)
    with pytest.raises(InputError, match="No space left"):
        onnx_forget.forget(model, 3, SAMPLES, report=tmp_path / "report.json", **FEW_SAMPLES)
    assert snapshot(tmp_path) == before


def _external_pair(folder: Path, forget_class: int) -> Path:
    """Forget `forget_class` in the external-data CNN copied into `folder`: an output pair
    `out.onnx` + side file, replacing any there."""
    if not (folder / "model.onnx").exists():
        shutil.copytree(EXTERNAL, folder, dirs_exist_ok=True)
    onnx_forget.forget(
        folder / "model.onnx", forget_class, SAMPLES, output=folder / "out.onnx", force=True,
        **FEW_SAMPLES,
    )  # fmt: skip
    return folder / "out.onnx"


def _pair_bytes(folder: Path) -> dict[str, str]:
    """The output pair: the `.onnx` and every side file, by name."""
    return {p.name: sha256(p) for p in folder.iterdir() if p.name.startswith("out.onnx")}


def test_replacing_a_pair_keeps_it_whole_if_interrupted_between_renames(tmp_path, monkeypatch):
    """Ctrl-C after the new external data is renamed into place but before the new `.onnx`
    is: the old pair still loads with its own weights, and nothing new is left."""
    old = load_model(_external_pair(tmp_path, 3)).proto
    old_pair = _pair_bytes(tmp_path)
    renames, real_replace = [], os.replace

    def interrupted_second(source, destination):
        renames.append(Path(destination).name)
        if len(renames) == 2:
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(outputs.os, "replace", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        _external_pair(tmp_path, 4)
    assert renames[1] == "out.onnx" and renames[0].endswith(".data")
    assert _pair_bytes(tmp_path) == old_pair
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx-forget-")]
    reloaded = load_model(tmp_path / "out.onnx").proto
    assert [t.raw_data for t in reloaded.graph.initializer] == [
        t.raw_data for t in old.graph.initializer
    ]


def test_replacing_a_pair_removes_the_old_side_file(tmp_path):
    """Run after run with --force: one `.onnx` and the one side file it reads."""
    for forget_class in (3, 4, 5):
        _external_pair(tmp_path, forget_class)
        pair = _pair_bytes(tmp_path)
        assert len(pair) == 2, pair
        model = onnx.load(tmp_path / "out.onnx", load_external_data=False)
        locations = {
            e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"
        }
        assert locations == set(pair) - {"out.onnx"}
        props = {p.key: p.value for p in load_model(tmp_path / "out.onnx").proto.metadata_props}
        assert props["onnx_forget.forgotten_classes"] == str(forget_class)


def test_statistics_of_a_model_whose_external_data_changed_are_refused(tmp_path):
    """The model's identity covers its external weights, not only the `.onnx` bytes."""
    shutil.copytree(EXTERNAL, tmp_path / "model")
    digits = np.load(HELD_OUT)
    chosen = np.concatenate([np.flatnonzero(digits["y"] == c)[:3] for c in (3, 4)])
    statistics = onnx_forget.collect(
        tmp_path / "model" / "model.onnx", (digits["x"][chosen], digits["y"][chosen])
    )
    statistics.save(tmp_path / "stats.npz")
    data = tmp_path / "model" / "model.onnx.data"
    weights = bytearray(data.read_bytes())
    weights[100:104] = np.float32(0.5).tobytes()  # a weight of the first conv, still valid
    data.write_bytes(bytes(weights))
    process = run_cli(
        "model/model.onnx", "--forget-class", "3", "--stats", "stats.npz", "-o", "out.onnx",
        cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == EXIT_USAGE, process.stderr
    assert "another model" in process.stderr and len(process.stderr.splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_a_clean_run_writes_exactly_its_outputs(tmp_path):
    """Model, side file and report appear; no staging file stays behind."""
    _run_folder(tmp_path)
    before = listing(tmp_path)
    process = run_cli(
        "external/model.onnx", "--forget-class", "3", "--samples", "samples-link", "-o",
        "out.onnx", "--report", "report.json", "-q", *FAST, cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert listing(tmp_path) - before == {"out.onnx", "out.onnx.data", "report.json"}
    assert json.loads((tmp_path / "report.json").read_text())["output"] == "out.onnx"


# --- outputs that cannot be written, or written through ---------------------------------


def _unwritable_output_folder(tmp):
    """sysfs takes no new file, even from root (for whom permissions are no test)."""
    return forget_args(MODEL.name, SAMPLES, "-o", "/sys/out.onnx"), EXIT_USAGE, ("/sys",)


@pytest.mark.parametrize("setup", [_unwritable_output_folder], ids=setup_id)
@pytest.mark.usefixtures("one_blas_thread")
def test_unwritable_output_folder_is_refused(refusals, setup):
    """Nowhere to write the output: exit 2 naming the folder, after the whole run."""
    refusals[setup].check()


@pytest.mark.usefixtures("one_blas_thread")
def test_external_data_is_written_inside_the_output_folder_only(tmp_path):
    """A link planted where the output's `.data` goes is replaced, not written through."""
    external_model(tmp_path / "models")
    victim = secret_file(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "new.onnx.data").symlink_to(victim)
    process = run_cli(*forget_args("models/model.onnx"), "-o", "out/new.onnx", "-q", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert victim.read_bytes() == SECRET
    assert not (tmp_path / "out" / "new.onnx.data").is_symlink()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.onnx", "new.onnx.data"]
    assert len(load_model(tmp_path / "out" / "new.onnx").proto.graph.initializer) == 10
