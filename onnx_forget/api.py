"""The public entry points. Each strings the data's path together and returns a result:
`forget` (samples or statistics → new model), `collect` and `merge` (statistics files),
`tune` (α search), `evaluate` (a model on labelled samples), `layers` (what is projected).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import InputError, UnsupportedModelError
from .gram import StatisticsCollector, statistic_layers
from .gram_file import ClassStatistics, load_statistics, merge_statistics, statistic_id
from .layer_scan import Head, LayerScan, find_head, scan_layers
from .metrics import (
    Accuracy,
    agreement,
    class_scores,
    confusion,
    mean_kl_divergence,
    membership_attack,
    true_class_confidence,
)
from .modelio import (
    MODEL_OUTPUT,
    REPORT_OUTPUT,
    LoadedModel,
    OutputFiles,
    check_outputs,
    load_model,
    needs_external_data,
)
from .options import DEFAULT_MAX_MODEL_BYTES, METHODS, ForgetOptions
from .progress import progress_bar
from .repair import HeadSystem, forget_targets, write_head
from .report import Comparison, Report, layer_rows
from .rewrite import rewrite_model
from .runtime import Runner, open_runner
from .samples import (
    SampleSet,
    choose_from_class,
    open_samples,
    select_samples,
    split_validation,
)
from .signature import Signature, read_signature
from .subspace import Projections, SpacePair
from .taps import add_taps
from .verify import verify_file, verify_model
from .version import VERSION

RETAIN, FORGET = "retain", "forget"
REPAIR, PAPER = METHODS
# ALGORITHM.md: the grid the paper searched, scored by retain_acc * (100 - forget_acc).
ALPHA_R_GRID = (10.0, 30.0, 100.0, 300.0, 1000.0)
ALPHA_F_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
VALIDATION_SHARE = 0.2  # of each class's samples, held back for --tune without --eval-samples

Samples = str | os.PathLike | tuple[np.ndarray, np.ndarray]
PathArgument = str | os.PathLike


@dataclass
class ForgetResult:
    """The rewritten model and the report of the run that made it."""

    model: onnx.ModelProto
    report: Report
    output: Path | None


@dataclass
class TuneResult:
    """The best model of an α search and the score of every grid point."""

    result: ForgetResult
    grid: list[dict]  # alpha_r, alpha_f, retain, forget, score: one per grid point
    best: dict


class _PhaseTimer:
    """Seconds per phase; a phase timed inside another is not counted twice."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase, the seconds of phases inside it

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            own = elapsed - self._inner.pop()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + own
            if self._inner:
                self._inner[-1] += elapsed


@dataclass
class _OpenModel:
    """A loaded model with what every entry point needs to know about it."""

    loaded: LoadedModel
    signature: Signature
    scan: LayerScan
    settings: ForgetOptions

    @classmethod
    def of(cls, model, settings: ForgetOptions, projected: bool = True) -> _OpenModel:
        """Load and inspect `model`; with `projected`, refuse it without a layer to project."""
        loaded = load_model(model, settings.max_model_bytes)
        where = loaded.path or "in-memory model"
        scan = scan_layers(loaded.proto)
        if projected and not scan.layers:
            raise UnsupportedModelError(
                f"{where}: no projectable Conv, Gemm or MatMul layer "
                "(`onnx-forget layers` says why each was skipped)"
            )
        try:
            signature = read_signature(loaded.proto, settings.output_name)
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"{where}: {error}") from None
        return cls(loaded, signature, scan, settings)

    def runner(self, model: onnx.ModelProto) -> Runner:
        try:
            return open_runner(
                model,
                self.settings.device,
                self.settings.batch_size,
                self.signature.fixed_batch,
                self.signature.input_name,
            )
        except UnsupportedModelError as error:  # name the file the user gave
            raise UnsupportedModelError(
                f"{self.loaded.path or 'in-memory model'}: {error}"
            ) from None

    def samples(self, source: Samples) -> SampleSet:
        return open_samples(
            source,
            self.signature,
            self.settings.preprocessing,
            self.settings.class_names,
            self.settings.max_sample_bytes,
        )

    def scores(self, runner: Runner, samples: SampleSet, indices: np.ndarray) -> np.ndarray:
        return class_scores(runner, samples, indices, self.signature.scores_name)

    @property
    def inputs(self) -> dict[str, tuple[Path, ...]]:
        """The files this model was read from, for `check_outputs`."""
        if self.loaded.path is None:
            return {}
        return {
            "the model": (self.loaded.path,),
            "the model's external data": self.loaded.external_files,
        }

    @property
    def head(self) -> Head | None:
        """The layer writing the logits, when the class count is known."""
        count = self.signature.class_count
        if not count:
            return None
        return find_head(self.loaded.proto, self.scan, count, self.signature.scores_name)

    def tapped_runner(self, also: tuple[tuple[str, np.dtype], ...] = ()) -> Runner:
        """A session on the model with every layer's input (and `also`) as outputs."""
        tapped = add_taps(self.loaded.proto, self.scan.layers, self.signature.scores_name, also)
        return self.runner(tapped)

    def collect(
        self,
        runner: Runner,
        sample_set: SampleSet,
        sets: dict[str, np.ndarray],
        kept: tuple[str, ...] = (),
    ) -> tuple[StatisticsCollector, dict[str, dict[str, np.ndarray]]]:
        """One pass of the tapped model over each set: its Gram matrices, and per set the
        scores and the `kept` tensors, `[n, ...]` each in set order."""
        collector = StatisticsCollector(
            self.scan.layers,
            {name: sample_set.labels[indices] for name, indices in sets.items()},
            self.settings.max_patches,
            self.settings.seed,
            runner.gram_products,
        )
        outputs = [o.name for o in runner.session.get_outputs()]
        keep = list(dict.fromkeys([self.signature.scores_name, *kept]))
        values_by_set = {}
        total = sum(len(indices) for indices in sets.values())
        with progress_bar(total, "collecting", self.settings.progress) as bar:
            for name, indices in sets.items():
                done, batches = 0, {tensor: [] for tensor in keep}
                for batch, values in runner.run(sample_set.load, indices, outputs):
                    named = dict(zip(outputs, values))
                    collector.add(name, named, done)
                    for tensor in keep:
                        batches[tensor].append(named[tensor].astype(np.float64))
                    done += len(batch)
                    bar.update(len(batch))
                    del values, named  # not alive while the next batch runs
                values_by_set[name] = {
                    tensor: np.concatenate(parts) if parts else np.zeros((0, 0))
                    for tensor, parts in batches.items()
                }
        return collector, values_by_set


def _classes(forget_classes: int | Iterable[int]) -> list[int]:
    values = [forget_classes] if np.isscalar(forget_classes) else forget_classes
    classes = sorted({int(c) for c in values})
    if not classes:
        raise InputError("name at least one class to forget")
    return classes


def layers(
    model: str | os.PathLike | onnx.ModelProto, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> LayerScan:
    """The projectable and skipped layers of a model."""
    return scan_layers(load_model(model, max_model_bytes).proto)


def default_output(model_path: Path, forget_classes: list[int]) -> Path:
    """`<stem>.forget-<classes>.onnx` beside the input."""
    classes = "-".join(str(c) for c in forget_classes)
    return model_path.with_name(f"{model_path.stem}.forget-{classes}.onnx")


def forget(
    model: str | os.PathLike | onnx.ModelProto,
    forget_classes: int | Iterable[int],
    samples: Samples | None = None,
    *,
    stats: str | os.PathLike | ClassStatistics | None = None,
    output: PathArgument | None = None,
    force: bool = False,
    eval_samples: Samples | None = None,
    report: PathArgument | None = None,
    **options,
) -> ForgetResult:
    """Forget `forget_classes` in `model`, from `samples` or from collected `stats`.

    A model given by path is written beside itself (or to `output`); a ModelProto is
    written only when `output` is given. `report` writes the report as JSON, with the
    model as one transaction. No output may be an input. Keyword options are the fields
    of ForgetOptions.
    """
    settings = ForgetOptions.from_keywords(**options)
    classes = _classes(forget_classes)
    if (samples is None) == (stats is None):
        raise InputError("give either samples or a statistics file (--samples or --stats)")
    run = _Run(settings, classes)
    with run.timer("load"):
        opened = _OpenModel.of(model, settings)
    with run.timer("samples"):
        sample_set = opened.samples(samples) if samples is not None else None
        destination = _destination(opened.loaded.path, output, classes)
        _check_run_outputs(
            opened, destination, report, force, sample_set, eval_samples, stats=stats
        )
    used = None
    if sample_set is None:
        run.spaces_from_statistics(opened, stats)
    else:
        with run.timer("samples"):
            retain, forget_indices = _choose_sets(sample_set, classes, opened, settings)
        used = run.spaces_from_samples(opened, sample_set, retain, forget_indices)
    return run.finish(
        opened, settings.alpha_r, settings.alpha_f, destination, used, eval_samples, report
    )


def tune(
    model: str | os.PathLike | onnx.ModelProto,
    forget_classes: int | Iterable[int],
    samples: Samples,
    *,
    eval_samples: Samples | None = None,
    alpha_r_grid: Iterable[float] = ALPHA_R_GRID,
    alpha_f_grid: Iterable[float] = ALPHA_F_GRID,
    output: PathArgument | None = None,
    force: bool = False,
    report: PathArgument | None = None,
    **options,
) -> TuneResult:
    """Search (α_r, α_f) on a grid, scoring `retain_acc * (100 - forget_acc)` on validation
    samples, and write the best model.

    Validation is `eval_samples` when given, else a seeded share of each class of
    `samples`. The tapped model runs once over the fit samples for the statistics; each
    grid point then factors the Gram matrices at its α, rewrites the weights, refits the
    head (with the default method: one more run of the fit samples, through the rewritten
    model) and runs the validation samples.
    """
    settings = ForgetOptions.from_keywords(**options)
    classes = _classes(forget_classes)
    run = _Run(settings, classes)
    with run.timer("load"):
        opened = _OpenModel.of(model, settings)
    with run.timer("samples"):
        sample_set = opened.samples(samples)
        destination = _destination(opened.loaded.path, output, classes)
        _check_run_outputs(opened, destination, report, force, sample_set, eval_samples)
        if eval_samples is None:
            fit, validation_indices = split_validation(
                sample_set.labels, VALIDATION_SHARE, settings.seed
            )
            validation = sample_set
        else:
            fit, validation = np.arange(len(sample_set)), opened.samples(eval_samples)
            validation_indices = np.arange(len(validation))
        retain, forget_indices = _choose_sets(sample_set, classes, opened, settings, fit)
    used = run.spaces_from_samples(opened, sample_set, retain, forget_indices)
    grid = []
    with run.timer("tune"):
        labels = validation.labels[validation_indices]
        for alpha_r in alpha_r_grid:
            for alpha_f in alpha_f_grid:
                candidate, _ = run.build(opened, alpha_r, alpha_f, used)
                scores = opened.scores(opened.runner(candidate), validation, validation_indices)
                accuracy = Accuracy.of(labels, np.argmax(scores, axis=1), classes)
                grid.append(
                    {
                        "alpha_r": float(alpha_r),
                        "alpha_f": float(alpha_f),
                        "retain": accuracy.retain,
                        "forget": accuracy.forget,
                        "score": accuracy.retain * (100.0 - accuracy.forget),
                    }
                )
    best = max(grid, key=lambda point: point["score"])
    result = run.finish(
        opened, best["alpha_r"], best["alpha_f"], destination, used, eval_samples, report, grid
    )
    return TuneResult(result, grid, best)


def collect(
    model: str | os.PathLike | onnx.ModelProto,
    samples: Samples,
    *,
    classes: Iterable[int] | None = None,
    per_class: int | None = None,
    output: PathArgument | None = None,
    force: bool = False,
    report: PathArgument | None = None,
    **options,
) -> ClassStatistics:
    """Gram matrices per statistic and per class, to forget any class later without samples.

    Every sample of each class is used unless `per_class` caps them (seeded choice).
    `output` writes the statistics file and `report` its summary as JSON, together.
    """
    settings = ForgetOptions.from_keywords(**options)
    opened = _OpenModel.of(model, settings)
    sample_set = opened.samples(samples)
    outputs = {"statistics file": _path(output), REPORT_OUTPUT: _path(report)}
    inputs = {**opened.inputs, **_sample_inputs(sample_set, settings)}
    check_outputs(outputs, inputs, force)
    present = [int(c) for c in np.unique(sample_set.labels)]
    wanted = present if classes is None else sorted({int(c) for c in classes})
    missing = [c for c in wanted if c not in present]
    if missing:
        raise InputError(f"{sample_set.origin}: no samples of class {missing[0]}")
    cap = per_class if per_class is not None else len(sample_set)
    sets = {
        str(label): choose_from_class(sample_set.labels, label, cap, settings.seed)
        for label in wanted
    }
    collector, _ = opened.collect(opened.tapped_runner(), sample_set, sets)
    statistic_keys = list(collector.accumulators)
    grams, vectors = {}, {}
    for number, key in enumerate(statistic_keys):
        for label in wanted:
            accumulator = collector.accumulators[key][str(label)]
            grams[number, label] = accumulator.gram
            vectors[number, label] = accumulator.vectors
    statistics = ClassStatistics(
        model_sha256=opened.loaded.sha256,
        statistics=[statistic_id(layer) for layer in statistic_layers(opened.scan.layers)],
        options=_statistics_options(settings),
        samples={label: len(sets[str(label)]) for label in wanted},
        grams=grams,
        vectors=vectors,
    )
    _write_statistics(statistics, outputs)
    return statistics


def merge(
    parts: Iterable[PathArgument],
    *,
    output: PathArgument | None = None,
    force: bool = False,
    report: PathArgument | None = None,
) -> ClassStatistics:
    """Add statistics files collected on shards of the samples of one model; `output`
    writes the sum and `report` its summary as JSON, together."""
    paths = [Path(p) for p in parts]
    if len(paths) < 2:
        raise InputError("give at least two statistics files to merge")
    outputs = {"statistics file": _path(output), REPORT_OUTPUT: _path(report)}
    check_outputs(outputs, {"a statistics file to merge": paths}, force)
    statistics = merge_statistics([load_statistics(p) for p in paths], [str(p) for p in paths])
    _write_statistics(statistics, outputs)
    return statistics


def _write_statistics(statistics: ClassStatistics, outputs: dict[str, Path | None]) -> None:
    """The statistics file and the JSON summary of it, as one transaction."""
    path, report = outputs["statistics file"], outputs[REPORT_OUTPUT]
    with OutputFiles() as files:
        if path is not None:
            files.add_file(path, statistics.write)
        if report is not None:
            summary = statistics.summary(str(path) if path else None)
            files.add_text(report, json_text(summary))
        files.commit()


def json_text(document: dict) -> str:
    """A report as the JSON text written to `--report` files."""
    return json.dumps(document, indent=2) + "\n"


def _path(value: PathArgument | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass
class Evaluation:
    """A model on labelled samples, optionally against the model it was made from."""

    accuracy: Accuracy
    forgotten_classes: list[int]
    confusion: dict[int, dict[int, int]]
    agreement: float | None  # percent of kept-class samples with the reference's top-1
    kl_divergence: float | None  # mean KL(reference || model) on kept-class samples
    membership: dict[str, float] | None  # attack's "member" share of forgotten samples

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(
    model: str | os.PathLike | onnx.ModelProto,
    samples: Samples,
    *,
    reference: str | os.PathLike | onnx.ModelProto | None = None,
    forget_classes: Iterable[int] | None = None,
    members: Samples | None = None,
    report: PathArgument | None = None,
    **options,
) -> Evaluation:
    """Accuracy per class, where forgotten samples go, agreement with `reference`, and —
    with `members` (samples the model was trained on) — the membership-inference share
    of the forgotten classes' member samples, for the model and the reference.

    Forgotten classes default to what the model's metadata records. `report` writes the
    evaluation as JSON.
    """
    settings = ForgetOptions.from_keywords(**options)
    opened = _OpenModel.of(model, settings, projected=False)
    other = None if reference is None else _OpenModel.of(reference, settings, projected=False)
    held_out = opened.samples(samples)
    inputs = {
        **(other.inputs if other else {}),
        **opened.inputs,
        **_sample_inputs(held_out, settings),
        "the member samples": _given_paths(members),
    }
    check_outputs({REPORT_OUTPUT: _path(report)}, inputs, force=False)
    if forget_classes is None:
        recorded = {p.key: p.value for p in opened.loaded.proto.metadata_props}.get(
            "onnx_forget.forgotten_classes", ""
        )
        forget_classes = [int(c) for c in recorded.split(",") if c]
    classes = sorted({int(c) for c in forget_classes})
    everything = np.arange(len(held_out))
    scores = opened.scores(opened.runner(opened.loaded.proto), held_out, everything)
    predictions = np.argmax(scores, axis=1)
    kept = ~np.isin(held_out.labels, classes)
    result = Evaluation(
        accuracy=Accuracy.of(held_out.labels, predictions, classes),
        forgotten_classes=classes,
        confusion=confusion(held_out.labels, predictions, classes),
        agreement=None,
        kl_divergence=None,
        membership=None,
    )
    models = {"model": (opened, scores)}
    if other is not None:
        reference_scores = other.scores(other.runner(other.loaded.proto), held_out, everything)
        result.agreement = agreement(scores[kept], reference_scores[kept])
        result.kl_divergence = mean_kl_divergence(scores[kept], reference_scores[kept])
        models["reference"] = (other, reference_scores)
    if members is not None:
        member_set = opened.samples(members)
        every_member = np.arange(len(member_set))
        result.membership = {}
        for name, (which, held_scores) in models.items():
            member_scores = which.scores(which.runner(which.loaded.proto), member_set, every_member)
            result.membership[name] = _membership(
                member_scores, member_set.labels, held_scores, held_out.labels, classes
            )
    if report is not None:
        with OutputFiles() as files:
            files.add_text(Path(report), json_text(result.to_dict()))
            files.commit()
    return result


def _membership(member_scores, member_labels, held_scores, held_labels, classes) -> float:
    """The attack's member share of the forgotten classes' training samples."""
    member_kept = ~np.isin(member_labels, classes)
    held_kept = ~np.isin(held_labels, classes)
    return membership_attack(
        true_class_confidence(member_scores[member_kept], member_labels[member_kept]),
        true_class_confidence(held_scores[held_kept], held_labels[held_kept]),
        true_class_confidence(member_scores[~member_kept], member_labels[~member_kept]),
    )


class _Run:
    """State of one forget run: its timer, its decompositions and how to finish it."""

    def __init__(self, settings: ForgetOptions, classes: list[int]):
        self.settings = settings
        self.classes = classes
        self.timer = _PhaseTimer()
        self.spaces: dict[tuple, SpacePair] = {}
        self.provider: tuple[str, str | None] = ("none (statistics file)", None)
        self.sample_counts: dict = {}
        self.notes: list[str] = []  # what the report must say the run could not do

    def projections(self, alpha_r: float, alpha_f: float) -> Projections:
        """Factored one statistic at a time while the weights are rewritten."""
        return Projections(self.spaces, alpha_r, alpha_f, lambda: self.timer("decompose"))

    def spaces_from_samples(self, opened, sample_set, retain, forget_indices) -> dict:
        """Run the tapped model once over both sets; returns what evaluation reuses."""
        head = opened.head if self.settings.method == REPAIR else None
        logits = ((head.logits, head.layer.weight_dtype),) if head else ()
        with self.timer("taps"):
            runner = opened.tapped_runner(logits)
        with self.timer("collect"):
            collector, kept = opened.collect(
                runner,
                sample_set,
                {RETAIN: retain, FORGET: forget_indices},
                tuple(name for name, _ in logits),
            )
        self.spaces = {
            key: SpacePair(collector.gram(key, RETAIN), collector.gram(key, FORGET))
            for key in collector.accumulators
        }
        self.provider = (runner.provider, runner.provider_note)
        samples = len(retain) + len(forget_indices)
        self.sample_counts = {
            "origin": sample_set.origin,
            "retain": len(retain),
            "forget": len(forget_indices),
            "skipped_files": sample_set.skipped_files,
        }

        def both(tensor):
            return np.concatenate([kept[RETAIN][tensor], kept[FORGET][tensor]])

        head_logits = both(head.logits) if head else None
        count = opened.signature.class_count
        if head_logits is not None and head_logits.shape != (samples, count):
            self.notes.append(
                f"head repair skipped: the head {head.layer.node!r} writes logits of shape "
                f"[n, {', '.join(map(str, head_logits.shape[1:]))}], not one row of "
                f"{count} per sample"
            )
            head_logits = None
        return {
            "samples": sample_set,
            "indices": np.concatenate([retain, forget_indices]),
            "scores": both(opened.signature.scores_name),
            "head_logits": head_logits,
        }

    def method(self, used) -> str:
        """The method applied: the head repair needs samples and a head to refit."""
        if used is not None and used["head_logits"] is not None:
            return REPAIR
        return PAPER

    def method_note(self, opened: _OpenModel, used) -> None:
        """Say why the head repair asked for was not applied."""
        if self.settings.method != REPAIR or self.method(used) == REPAIR:
            return
        if used is None:
            reason = "a statistics file holds no samples to refit the head with"
        elif opened.head is None:
            reason = "no fully connected layer with one output per class feeds the scores"
        else:
            return  # the shape of the logits was noted when they were collected
        self.notes.append(f"head repair skipped: {reason}; the paper's method was applied")

    def build(self, opened, alpha_r, alpha_f, used) -> tuple[onnx.ModelProto, list[str]]:
        """The projected model, its head repaired when the method and samples allow."""
        metadata = _metadata(opened.loaded, self.classes, alpha_r, alpha_f, self.sample_counts)
        projections = self.projections(alpha_r, alpha_f)
        model, copies = rewrite_model(
            opened.loaded.proto, opened.scan.layers, projections.factor, metadata
        )
        if self.method(used) == REPAIR:
            model = self._repair_head(opened, model, used)
        return model, copies

    def _repair_head(self, opened, model: onnx.ModelProto, used: dict) -> onnx.ModelProto:
        """Refit the projected model's head on the samples used (repair.py)."""
        count = opened.signature.class_count
        head = find_head(model, scan_layers(model), count, opened.signature.scores_name)
        runner = opened.runner(add_taps(model, (head.layer,), opened.signature.scores_name))
        labels = used["samples"].labels[used["indices"]]
        targets = used["head_logits"].copy()  # the collected logits serve every α tried
        forgotten = np.isin(labels, self.classes)
        targets[forgotten] = forget_targets(targets[forgotten], self.classes)
        system = HeadSystem(head.layer.input_size, count, head.bias is not None)
        done = 0
        for batch, (features,) in runner.run(
            used["samples"].load, used["indices"], [head.layer.input]
        ):
            system.add(
                features.reshape(-1, head.layer.input_size), targets[done : done + len(batch)]
            )
            done += len(batch)
        return write_head(model, head, system)

    def spaces_from_statistics(self, opened, stats) -> None:
        with self.timer("samples"):
            statistics = stats if isinstance(stats, ClassStatistics) else load_statistics(stats)
            kept = _check_statistics(statistics, opened, self.classes, stats)
        self.spaces = {
            layer.statistic_key: SpacePair(
                statistics.summed(number, kept), statistics.summed(number, self.classes)
            )
            for number, layer in enumerate(statistic_layers(opened.scan.layers))
        }
        self.sample_counts = {
            "origin": str(stats) if not isinstance(stats, ClassStatistics) else "(statistics)",
            "retain": sum(statistics.samples[c] for c in kept),
            "forget": sum(statistics.samples[c] for c in self.classes),
            "skipped_files": 0,
        }

    def finish(
        self, opened, alpha_r, alpha_f, destination, used, eval_samples, report_path, tuning=None
    ):
        """Project, rewrite, evaluate, then stage and verify the model and the report and
        rename both into place. Evaluating first means a bad --eval-samples file or a
        Ctrl-C while evaluating leaves no output behind."""
        with self.timer("rewrite"):
            new_model, copies = self.build(opened, alpha_r, alpha_f, used)
        self.method_note(opened, used)
        self.spaces = {}  # the Gram matrices are done with: evaluation needs the memory
        with self.timer("evaluate"):
            comparisons, extras = self._compare(opened, new_model, used, eval_samples)
        with OutputFiles() as files:
            with self.timer("save"):
                if destination is None:
                    verify_model(new_model, opened.loaded.proto)
                else:
                    files.add_model(
                        new_model,
                        destination,
                        needs_external_data(new_model, opened.loaded.has_external_data),
                        lambda staged: verify_file(staged, opened.loaded.proto),
                    )
            report = self._report(opened, alpha_r, alpha_f, destination, used, copies, tuning)
            report.comparisons, report.confusion = comparisons, extras.get("confusion")
            report.membership = extras.get("membership")
            if report_path is not None:
                files.add_text(Path(report_path), json_text(report.to_dict()))
            files.commit()
        return ForgetResult(new_model, report, destination)

    def _report(self, opened, alpha_r, alpha_f, destination, used, copies, tuning) -> Report:
        options = _options_dict(self.settings)
        options.update(alpha_r=float(alpha_r), alpha_f=float(alpha_f), method=self.method(used))
        return Report(
            model=str(opened.loaded.path) if opened.loaded.path else "(in memory)",
            output=str(destination) if destination else None,
            forgotten_classes=self.classes,
            options=options,
            provider=self.provider[0],
            provider_note=self.provider[1],
            layers=layer_rows(LayerScan(opened.scan.layers, ())),
            skipped_layers=layer_rows(LayerScan((), opened.scan.skipped)),
            copied_weights=copies,
            samples=self.sample_counts,
            timings=self.timer.seconds,
            notes=self.notes,
            tuning=tuning,
        )

    def _compare(self, opened, new_model, used, eval_samples):
        """Before/after accuracy on the samples used and on `eval_samples`; with both, the
        membership-inference share of the forgotten samples and where they now go."""
        new_runner = opened.runner(new_model)
        comparisons, extras = [], {}
        after_used = None
        if used is not None:
            labels = used["samples"].labels[used["indices"]]
            after_used = opened.scores(new_runner, used["samples"], used["indices"])
            comparisons.append(
                Comparison(
                    "samples",
                    Accuracy.of(labels, np.argmax(used["scores"], axis=1), self.classes),
                    Accuracy.of(labels, np.argmax(after_used, axis=1), self.classes),
                )
            )
            extras["confusion"] = confusion(labels, np.argmax(after_used, 1), self.classes)
        if eval_samples is None:
            return comparisons, extras
        held_out = opened.samples(eval_samples)
        everything = np.arange(len(held_out))
        before = opened.scores(opened.runner(opened.loaded.proto), held_out, everything)
        after = opened.scores(new_runner, held_out, everything)
        comparisons.append(
            Comparison(
                "eval",
                Accuracy.of(held_out.labels, np.argmax(before, axis=1), self.classes),
                Accuracy.of(held_out.labels, np.argmax(after, axis=1), self.classes),
            )
        )
        extras["confusion"] = confusion(held_out.labels, np.argmax(after, 1), self.classes)
        if used is not None:
            member_labels = used["samples"].labels[used["indices"]]
            extras["membership"] = {
                name: _membership(
                    member_scores, member_labels, held_scores, held_out.labels, self.classes
                )
                for name, member_scores, held_scores in (
                    ("before", used["scores"], before),
                    ("after", after_used, after),
                )
            }
        return comparisons, extras


def _metadata(loaded: LoadedModel, classes, alpha_r, alpha_f, counts) -> dict[str, str]:
    """This run's metadata props; a model forgotten before keeps its history.

    `onnx_forget.forgotten_classes` is every class forgotten so far, and
    `onnx_forget.history` a JSON list with one entry per run, oldest first.
    """
    previous = {p.key: p.value for p in loaded.proto.metadata_props}
    earlier = [int(c) for c in previous.get("onnx_forget.forgotten_classes", "").split(",") if c]
    this_run = {
        "forgotten_classes": classes,
        "alpha_r": float(alpha_r),
        "alpha_f": float(alpha_f),
        "samples": {"retain": counts["retain"], "forget": counts["forget"]},
        "source_sha256": loaded.sha256,
        "version": VERSION,
    }
    history = [*json.loads(previous.get("onnx_forget.history", "[]")), this_run]
    return {
        "onnx_forget.forgotten_classes": ",".join(map(str, sorted({*earlier, *classes}))),
        "onnx_forget.alpha_r": repr(float(alpha_r)),
        "onnx_forget.alpha_f": repr(float(alpha_f)),
        "onnx_forget.samples": f"retain={counts['retain']},forget={counts['forget']}",
        "onnx_forget.source_sha256": loaded.sha256,
        "onnx_forget.version": VERSION,
        "onnx_forget.history": json.dumps(history),
    }


def _check_statistics(statistics: ClassStatistics, opened: _OpenModel, classes, origin):
    """Refuse statistics of another model; return the kept classes they cover."""
    if statistics.model_sha256 != opened.loaded.sha256:
        raise InputError(
            f"{origin}: statistics were collected on another model (sha256 "
            f"{statistics.model_sha256[:12]}..., this one {opened.loaded.sha256[:12]}...)"
        )
    expected = [statistic_id(layer) for layer in statistic_layers(opened.scan.layers)]
    if statistics.statistics != expected:
        raise InputError(f"{origin}: statistics do not match this model's layers")
    missing = [c for c in classes if c not in statistics.samples]
    if missing:
        raise InputError(f"{origin}: no statistics for class {missing[0]} to forget")
    kept = [c for c in statistics.classes if c not in classes]
    if not kept:
        raise InputError(f"{origin}: no statistics of a class to keep")
    return kept


def _destination(model_path: Path | None, output, classes: list[int]) -> Path | None:
    """Where to write: `output`, else beside a model given by path, else nowhere."""
    if output is None:
        return None if model_path is None else default_output(model_path, classes)
    return Path(output)


def _check_run_outputs(
    opened: _OpenModel,
    destination: Path | None,
    report: PathArgument | None,
    force: bool,
    sample_set: SampleSet | None,
    eval_samples: Samples | None,
    stats: PathArgument | ClassStatistics | None = None,
) -> None:
    """Refuse a forget run's outputs that cannot be written or are one of its inputs."""
    inputs = {
        **opened.inputs,
        **(_sample_inputs(sample_set, opened.settings) if sample_set else {}),
        "the evaluation samples": _given_paths(eval_samples),
        "the statistics file": _given_paths(stats),
    }
    outputs = {MODEL_OUTPUT: destination, REPORT_OUTPUT: _path(report)}
    check_outputs(outputs, inputs, force)


def _sample_inputs(sample_set: SampleSet, settings: ForgetOptions) -> dict[str, tuple[Path, ...]]:
    return {
        "the samples": sample_set.paths,
        "the class names": _given_paths(settings.class_names),
    }


def _given_paths(value) -> tuple[Path, ...]:
    """The path among an argument that may also be arrays, names or statistics."""
    return (Path(value),) if isinstance(value, (str, os.PathLike)) else ()


def _choose_sets(
    sample_set: SampleSet,
    classes: list[int],
    opened: _OpenModel,
    settings: ForgetOptions,
    among: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Check the classes against model and samples, then pick retain and forget samples
    (from the indices `among`, default all)."""
    class_count = opened.signature.class_count
    if class_count is not None:
        beyond = [c for c in classes if c >= class_count] + sorted(
            {int(label) for label in sample_set.labels if label >= class_count}
        )
        if beyond:
            raise InputError(
                f"class {beyond[0]} does not exist: the model has {class_count} classes (0.."
                f"{class_count - 1})"
            )
    among = np.arange(len(sample_set)) if among is None else among
    labels = sample_set.labels[among]
    present = set(np.unique(labels).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise InputError(f"{sample_set.origin}: no samples of class {missing[0]} to forget")
    retain, forget_indices = select_samples(
        labels, classes, settings.retain_per_class, settings.forget_samples, settings.seed
    )
    if not len(retain):
        raise InputError("no samples of a class to keep: cannot forget every class")
    return among[retain], among[forget_indices]


def _options_dict(settings: ForgetOptions) -> dict:
    values = dataclasses.asdict(settings)
    values.pop("progress")
    if isinstance(settings.class_names, os.PathLike):  # a file of names: its path, as text
        values["class_names"] = str(settings.class_names)
    return values


def _statistics_options(settings: ForgetOptions) -> dict:
    """The options that shape statistics: files must agree on them to be combined."""
    return {
        "max_patches": settings.max_patches,
        "seed": settings.seed,
        "preprocessing": dataclasses.asdict(settings.preprocessing),
        "output_name": settings.output_name,
    }
