"""Fuzz the command line's paths and flags: no input may change, no file may be left.

Each case runs `python -m onnx_forget` in a fresh work folder of its own that holds copies
of the inputs: `model.onnx` (fixtures/mnist_cnn.onnx), `external/` (the external-data
model, `model.onnx` + `model.onnx.data`), `samples/` (6 images per class), `heldout.npz`
(10 digits per class), `a.npz` and `b.npz` (statistics made by `collect` at start-up),
`classes.txt` (class names 0..9), and links: `link.onnx` (symbolic) and `hard.onnx`
(hard) to the model, `samples-link` to the sample folder, `data-link.data` to the
external data. A seeded draw (`--seed`, case number) picks a subcommand (forget, with or
without the word; collect, merge, evaluate, layers), a subset of its flags and, for every
path argument, one of those inputs or links (spelled relative, `./x`, absolute or through
`samples/..`), a fresh name, a fresh name inside the sample folder, or a name in a missing
folder. Outputs (`-o`, `--report`) name an existing file half the time; `--force` is
given half the time. Few samples are used so a case takes a second or three.

A case fails when it
- crashes: an exit code outside {0, 2, 3, 4}, a signal, a traceback on stderr, or a
  refusal that is not exactly one stderr line;
- changes an input: a file that existed is gone or its bytes changed, a link points
  elsewhere or was replaced. The only entries that may change are, on exit 0, the outputs
  the case named (`-o`, the default `<model stem>.forget-<classes>.onnx`, `--report`,
  and a model output's `.data` side files) when `--force` was given (a report, like a
  log, needs no `--force`), and never one of the run's own inputs: a path that
  is, or resolves to, an input argument, the external data of an input model, or lies in
  an input folder;
- leaves a file: any new path but, on exit 0, those named outputs (and, beside a model
  output, a file whose name starts with the output's name and ends in `.data`; with
  `--force`, such a side file of the replaced output may also go);
- hangs: it runs past fuzz_models.CASE_TIMEOUT_S.

    python -m benchmarks.fuzz_cli [--minutes 10 | --cases N] [--seed 0] [--jobs 2] [--keep DIR]
    python benchmarks/fuzz_cli.py ...        # the same
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

if __package__ in (None, ""):  # `python benchmarks/fuzz_cli.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fuzz_models import (
    CASE_TIMEOUT_S,
    DOCUMENTED_EXITS,
    FIXTURES,
    SAMPLES_PER_CLASS,
    _pick,
    run_onnx_forget,
)

IMAGES_PER_CLASS = 6  # copied into each case's sample folder
HELD_OUT_PER_CLASS = 10
MAX_FAILURES_SHOWN = 20
SUBCOMMANDS = ("forget", "collect", "merge", "evaluate", "layers")
SUBCOMMAND_SHARES = (0.35, 0.2, 0.15, 0.2, 0.1)  # layers writes nothing: drawn least
FORCE_SHARE = 0.5
EXISTING_OUTPUT_SHARE = 0.5  # of outputs that name an existing path: the contract under test
SENSIBLE_INPUT_SHARE = 0.85  # of inputs drawn from those that suit the argument

# The work folder's inputs (copied per case) and links (made per case).
SAMPLE_FILE = "<a file in samples/>"  # drawn per case from the sample files
INPUTS = (
    "model.onnx",
    "external",
    "external/model.onnx",
    "external/model.onnx.data",
    "samples",
    SAMPLE_FILE,
    "heldout.npz",
    "a.npz",
    "b.npz",
    "classes.txt",
)
LINKS = {  # name: (kind, target)
    "link.onnx": ("symlink", "model.onnx"),
    "hard.onnx": ("hardlink", "model.onnx"),
    "samples-link": ("symlink", "samples"),
    "data-link.data": ("symlink", "external/model.onnx.data"),
}
EXISTING = (*INPUTS, *LINKS)
SENSIBLE = {  # the inputs that suit each kind of argument
    "model": ("model.onnx", "external/model.onnx", "link.onnx", "hard.onnx"),
    "samples": ("samples", "samples-link", "heldout.npz"),
    "stats": ("a.npz", "b.npz"),
    "class-names": ("classes.txt",),
}


@dataclass
class Case:
    """One drawn command line and what it names."""

    number: int
    subcommand: str
    args: list[str]
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (kind, path) it reads
    outputs: list[str] = field(default_factory=list)  # paths it may write on success
    model_outputs: list[str] = field(default_factory=list)  # of those, models (.data beside)
    reports: list[str] = field(default_factory=list)  # of those, reports (no --force needed)
    force: bool = False
    command_line: str = ""  # as drawn, absolute paths under $PWD, the case's folder


@dataclass
class Outcome:
    """What one case did."""

    case: int
    subcommand: str
    command_line: str
    code: int | None  # None: it ran past CASE_TIMEOUT_S
    stderr: str
    crash: list[str]  # exit code, traceback, refusal not one line
    changed: list[str]  # inputs gone or changed
    leftovers: list[str]  # new paths it may not leave
    seconds: float

    @property
    def hung(self) -> bool:
        return self.code is None

    @property
    def failed(self) -> bool:
        return self.hung or bool(self.crash or self.changed or self.leftovers)


# --- the work folder ---------------------------------------------------------------------


def build_template(folder: Path) -> list[str]:
    """The inputs every case copies; returns the sample files, relative to `folder`."""
    shutil.copy(FIXTURES / "mnist_cnn.onnx", folder / "model.onnx")
    shutil.copytree(FIXTURES / "mnist_cnn_external", folder / "external")
    sample_files = []
    for class_folder in sorted(p for p in (FIXTURES / "mnist_samples").iterdir() if p.is_dir()):
        (folder / "samples" / class_folder.name).mkdir(parents=True)
        for image in sorted(class_folder.iterdir())[:IMAGES_PER_CLASS]:
            relative = f"samples/{class_folder.name}/{image.name}"
            shutil.copy(image, folder / relative)
            sample_files.append(relative)
    with np.load(FIXTURES / "mnist_heldout.npz") as held_out:
        x, y = held_out["x"], held_out["y"]
    chosen = np.concatenate([np.flatnonzero(y == c)[:HELD_OUT_PER_CLASS] for c in np.unique(y)])
    np.savez(folder / "heldout.npz", x=x[chosen], y=y[chosen])
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in range(10)))
    for name, samples in (("a.npz", "samples"), ("b.npz", "heldout.npz")):
        command = ["collect", "model.onnx", "--samples", samples, "-o", name, "-q"]
        command += ["--per-class", str(SAMPLES_PER_CLASS), "--device", "cpu"]
        process = run_onnx_forget(command, folder)
        if process.returncode != 0:
            sys.exit(f"start-up: onnx-forget {shlex.join(command)} failed: {process.stderr}")
    return sample_files


def make_links(folder: Path) -> None:
    for name, (kind, target) in LINKS.items():
        if kind == "symlink":
            os.symlink(target, folder / name)
        else:
            os.link(folder / target, folder / name)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under `folder`, hidden ones included, with what it is: a link and its
    target, a folder, or a file and the SHA-256 of its bytes. Links are not followed."""
    entries = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root) / name
            relative = str(path.relative_to(folder))
            if path.is_symlink():
                entries[relative] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[relative] = ("folder",)
            elif path.is_file():
                entries[relative] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                entries[relative] = ("other",)
    return entries


# --- drawing a case ----------------------------------------------------------------------


class Draw:
    """The seeded choices of one case."""

    def __init__(self, seed: int, number: int, sample_files: list[str]):
        self.rng = np.random.default_rng([seed, number])
        self.sample_files = sample_files
        self.fresh = 0

    def chance(self, share: float) -> bool:
        return bool(self.rng.random() < share)

    def spelled(self, path: str) -> str:
        """An existing path, spelled one of several ways that name the same entry."""
        way = self.rng.random()
        if way < 0.2:
            return "ABS:" + path  # made absolute once the case's folder is known
        if way < 0.3:
            return "./" + path
        if way < 0.4:
            return "samples/../" + path
        return path

    def existing(self, choices=EXISTING) -> str:
        path = _pick(self.rng, choices)
        if path == SAMPLE_FILE:
            path = _pick(self.rng, self.sample_files)
        return self.spelled(path)

    def new(self, suffix: str) -> str:
        """A name that does not exist: in the work folder, the sample folder or nowhere."""
        self.fresh += 1
        name = f"new-{self.fresh}{suffix}"
        where = self.rng.random()
        if where < 0.6:
            return ("ABS:" if self.chance(0.2) else "") + name
        if where < 0.85:
            folder = _pick(self.rng, ("samples", "samples/3", "samples-link"))
            return f"{folder}/{name}"
        return f"missing/{name}"

    def any_path(self, suffix: str) -> str:
        return self.existing() if self.chance(0.6) else self.new(suffix)

    def input(self, kind: str, suffix: str = ".onnx") -> str:
        if self.chance(SENSIBLE_INPUT_SHARE):
            return self.existing(SENSIBLE[kind])
        return self.any_path(suffix)

    def output(self, suffix: str) -> str:
        return self.existing() if self.chance(EXISTING_OUTPUT_SHARE) else self.new(suffix)

    def classes(self) -> list[int]:
        if self.chance(0.15):
            return sorted(int(c) for c in self.rng.choice(10, size=2, replace=False))
        return [int(self.rng.integers(10))]


def draw_case(seed: int, number: int, sample_files: list[str]) -> Case:
    """A subcommand, a subset of its flags and a path for each path argument."""
    draw = Draw(seed, number, sample_files)
    subcommand = str(draw.rng.choice(SUBCOMMANDS, p=SUBCOMMAND_SHARES))
    case = Case(number, subcommand, [])
    args = case.args

    def read(flag: str | None, kind: str, path: str) -> None:
        args.extend([flag, path] if flag else [path])
        case.inputs.append((kind, path))

    def write(flag: str, path: str, model: bool = False) -> None:
        args.extend([flag, path])
        case.outputs.append(path)
        if model:
            case.model_outputs.append(path)
        if flag == "--report":
            case.reports.append(path)

    running = ["--device", "cpu"]
    if subcommand == "forget":
        if draw.chance(0.5):
            args.append("forget")  # else `onnx-forget MODEL ...`, forget by default
        model = draw.input("model")
        read(None, "model", model)
        classes = draw.classes()
        args += ["--forget-class", ",".join(map(str, classes))]
        tune = draw.chance(0.15)
        source = draw.rng.random()
        if tune or source < 0.6 or source >= 0.95:  # samples, or both
            read("--samples", "samples", draw.input("samples", ".npz"))
        if not tune and source >= 0.6:  # stats, or both
            read("--stats", "stats", draw.input("stats", ".npz"))
        if tune:
            args += ["--tune", "--alpha-r-grid", "100", "--alpha-f-grid", "3"]
        if draw.chance(0.7):
            write("-o", draw.output(".onnx"), model=True)
        else:
            default = Path(model).with_name(
                f"{Path(model).stem}.forget-{'-'.join(map(str, classes))}.onnx"
            )
            case.outputs.append(str(default))
            case.model_outputs.append(str(default))
        if draw.chance(0.3):
            read("--eval-samples", "samples", draw.input("samples", ".npz"))
        if draw.chance(0.2):
            read("--class-names", "class-names", draw.input("class-names", ".txt"))
        args += ["--retain-per-class", str(SAMPLES_PER_CLASS)]
        args += ["--forget-samples", str(SAMPLES_PER_CLASS), *running]
    elif subcommand == "collect":
        args.append(subcommand)
        read(None, "model", draw.input("model"))
        read("--samples", "samples", draw.input("samples", ".npz"))
        write("-o", draw.output(".npz"))
        if draw.chance(0.2):
            read("--class-names", "class-names", draw.input("class-names", ".txt"))
        args += ["--per-class", str(SAMPLES_PER_CLASS), *running]
    elif subcommand == "merge":
        args.append(subcommand)
        for _ in range(1 if draw.chance(0.1) else int(draw.rng.integers(2, 4))):
            read(None, "stats", draw.input("stats", ".npz"))
        write("-o", draw.output(".npz"))
    elif subcommand == "evaluate":
        args.append(subcommand)
        read(None, "model", draw.input("model"))
        read("--samples", "samples", draw.input("samples", ".npz"))
        if draw.chance(0.4):
            read("--reference", "model", draw.input("model"))
        if draw.chance(0.3):
            read("--members", "samples", draw.input("samples", ".npz"))
        if draw.chance(0.3):
            args += ["--forget-class", ",".join(map(str, draw.classes()))]
        if draw.chance(0.2):
            read("--class-names", "class-names", draw.input("class-names", ".txt"))
        args += running
    else:
        args.append(subcommand)
        read(None, "model", draw.input("model"))
        if draw.chance(0.5):
            args.append("--json")
    if subcommand != "layers":
        if draw.chance(0.4):
            write("--report", draw.output(".json"))
        if subcommand in ("forget", "collect", "merge") and draw.chance(FORCE_SHARE):
            args.append("--force")
            case.force = True
        if draw.chance(0.5):
            args.append("-q")
    case.command_line = shlex.join(["onnx-forget", *args]).replace("ABS:", "$PWD/")
    return case


def _absolute(case: Case, folder: Path) -> Case:
    """`case` with its `ABS:` paths made absolute inside `folder`."""

    def fix(path: str) -> str:
        return str(folder / path[4:]) if path.startswith("ABS:") else path

    case.args = [fix(a) for a in case.args]
    case.inputs = [(kind, fix(p)) for kind, p in case.inputs]
    case.outputs = [fix(p) for p in case.outputs]
    case.model_outputs = [fix(p) for p in case.model_outputs]
    case.reports = [fix(p) for p in case.reports]
    return case


# --- checking a case ---------------------------------------------------------------------


def _entry(folder: Path, path: str) -> str | None:
    """Where `path` (relative to `folder`) puts its last name, relative to `folder`, its
    parent's links resolved; None when the parent is missing or outside `folder`."""
    full = folder / path
    parent = Path(os.path.realpath(full.parent))
    if not parent.is_dir() or not parent.is_relative_to(folder):
        return None
    return str((parent / full.name).relative_to(folder))


def _external_data(model: Path) -> list[str]:
    """The real paths of the files a model's external data references name."""
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model: it references nothing
        return []
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [os.path.realpath(model.parent / location) for location in locations]


def _run_inputs(case: Case, folder: Path) -> tuple[set[str], set[str]]:
    """The run's inputs: the paths as named (normalised) and the real paths they reach."""
    named, real = set(), set()
    for kind, path in case.inputs:
        full = folder / path
        named.add(os.path.normpath(full))
        real.add(os.path.realpath(full))
        if kind == "model" and Path(os.path.realpath(full)).is_file():
            real.update(_external_data(Path(os.path.realpath(full))))
    return named, real


def _is_input(path: Path, named: set[str], real: set[str]) -> bool:
    """Whether `path` is, resolves to, or lies in one of the run's inputs."""
    lexical, resolved = os.path.normpath(path), os.path.realpath(path)
    return any(
        candidate == other or candidate.startswith(other + os.sep)
        for candidate, others in ((lexical, named), (resolved, real))
        for other in others
    )


def check(case: Case, folder: Path, before: dict, after: dict, code: int | None) -> tuple:
    """What the case changed that it may not, and the new paths it left."""
    named, real = _run_inputs(case, folder)
    replaceable, creatable = set(), set()
    if code == 0:
        for path in case.outputs:
            sides = [path + ".data"] if path in case.model_outputs else []
            for candidate in (path, *sides):
                entry = _entry(folder, candidate)
                if entry is None:
                    continue
                creatable.add(entry)
                may_replace = case.force or path in case.reports
                if may_replace and not _is_input(folder / candidate, named, real):
                    replaceable.add(entry)
    changed = []
    for path, state in sorted(before.items()):
        if path not in after:
            replaced_pair = case.force and _side_file(path, creatable, case, folder)
            if not replaced_pair or _is_input(folder / path, named, real):
                changed.append(f"{path} deleted")
        elif after[path] != state and path not in replaceable:
            if _is_input(folder / path, named, real):
                why = "an input of the run"
            elif path in creatable:
                why = "an existing output, without --force"
            else:
                why = "not an output"
            kinds = (state[0], after[path][0])
            what = {("link", "link"): "retargeted", ("file", "file"): "changed"}.get(kinds)
            changed.append(f"{path} {what or 'replaced'} ({why})")
    leftovers = []
    for path in sorted(set(after) - set(before)):
        if path in creatable or _side_file(path, creatable, case, folder):
            continue
        leftovers.append(path)
    return changed, leftovers


def _side_file(path: str, creatable: set[str], case: Case, folder: Path) -> bool:
    """A `<output name>...data` file beside a model output."""
    for output in case.model_outputs:
        entry = _entry(folder, output)
        if entry in creatable:
            beside = Path(entry).parent == Path(path).parent
            name = Path(path).name
            if beside and name.startswith(Path(entry).name) and name.endswith(".data"):
                return True
    return False


# --- running the cases -------------------------------------------------------------------


def make_case_folder(template: Path, folder: Path) -> None:
    shutil.copytree(template, folder, symlinks=True)
    make_links(folder)


def run_case(case: Case, template: Path, before: dict, work: Path, keep: Path | None) -> Outcome:
    """The CLI on one drawn command line in a work folder of its own, then the checks.
    `before` is the snapshot of every case folder as made, taken once (the statistics
    files are 100 MB each: hashing them twice a case would cost more than the run)."""
    folder = work / f"case-{case.number:05d}"
    make_case_folder(template, folder)
    case = _absolute(case, folder)
    start = time.perf_counter()
    try:
        process = run_onnx_forget(case.args, folder)
        code, stderr = process.returncode, process.stderr
    except subprocess.TimeoutExpired as expired:
        code, stderr = None, (expired.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    crash = []
    if code is not None and code not in DOCUMENTED_EXITS:
        crash.append(f"exit {code}")
    if "Traceback" in stderr:
        crash.append("traceback")
    if code not in (0, None) and len(stderr.splitlines()) != 1:
        crash.append(f"{len(stderr.splitlines())} stderr lines")
    changed, leftovers = check(case, folder, before, snapshot(folder), code)
    outcome = Outcome(
        case.number, case.subcommand, case.command_line, code, stderr, crash, changed,
        leftovers, seconds,
    )  # fmt: skip
    if keep is not None and outcome.failed:
        kept = keep / folder.name  # hard links where it can: the folder is deleted next
        shutil.copytree(folder, kept, symlinks=True, copy_function=_link_or_copy)
        (kept.parent / f"{folder.name}.txt").write_text(
            f"cd {folder.name} && {case.command_line}\nexit {code}\n{stderr}"
        )
    shutil.rmtree(folder, ignore_errors=True)
    return outcome


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="Run this long [10].")
    parser.add_argument("--cases", type=int, help="Stop after this many cases instead.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--keep", type=Path, help="Copy failing cases' work folders here, commands in .txt."
    )
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    counter = iter(range(sys.maxsize))
    with tempfile.TemporaryDirectory(prefix="onnx-forget-fuzz-cli-") as name:
        work = Path(name).resolve()
        template = work / "template"
        template.mkdir()
        sample_files = build_template(template)
        make_case_folder(template, work / "reference")
        before = snapshot(work / "reference")
        shutil.rmtree(work / "reference")
        start = time.perf_counter()
        deadline = start + 60 * args.minutes

        def worker() -> None:
            while True:
                with lock:
                    number = next(counter)
                    if args.cases is not None and number >= args.cases:
                        return
                    if args.cases is None and time.perf_counter() >= deadline:
                        return
                case = draw_case(args.seed, number, sample_files)
                outcome = run_case(case, template, before, work, args.keep)
                with lock:
                    outcomes.append(outcome)

        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(worker) for _ in range(args.jobs)]:
                future.result()
        elapsed = time.perf_counter() - start
    outcomes.sort(key=lambda o: o.case)
    report(outcomes, elapsed, args.jobs)
    sys.exit(1 if any(o.failed for o in outcomes) else 0)


def report(outcomes: list[Outcome], elapsed: float, jobs: int) -> None:
    print(f"cases run          {len(outcomes):6d}")
    print(f"wall time          {elapsed:6.0f} s   ({jobs} jobs)")
    print(
        f"tracebacks/crashes {sum(bool(o.crash) for o in outcomes):6d}   (exit outside "
        "0/2/3/4, a signal, a traceback, or a refusal not one stderr line)"
    )
    print(f"inputs changed     {sum(bool(o.changed) for o in outcomes):6d}")
    print(f"leftovers          {sum(bool(o.leftovers) for o in outcomes):6d}")
    print(f"hangs              {sum(o.hung for o in outcomes):6d}   (over {CASE_TIMEOUT_S} s)")
    print("exit codes per subcommand")
    for subcommand in SUBCOMMANDS:
        codes = Counter(
            "hang" if o.hung else o.code for o in outcomes if o.subcommand == subcommand
        )
        shown = ", ".join(f"{code}: {count}" for code, count in sorted(codes.items(), key=str))
        print(f"  {subcommand:9s} {shown or '-'}")
    failures = [o for o in outcomes if o.failed]
    for outcome in failures[:MAX_FAILURES_SHOWN]:
        broke = [*outcome.crash, *outcome.changed]
        broke += [f"left {path}" for path in outcome.leftovers]
        broke += ["hang"] if outcome.hung else []
        last = outcome.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        print(f"\ncase {outcome.case}: {outcome.command_line}")
        print(f"  exit {outcome.code}: {'; '.join(broke)}")
        print(f"  stderr: {last[0][:200]}")
    if len(failures) > MAX_FAILURES_SHOWN:
        print(f"\n... and {len(failures) - MAX_FAILURES_SHOWN} more failures")


if __name__ == "__main__":
    main()
