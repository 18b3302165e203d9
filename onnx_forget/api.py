"""The public entry points, each reading as the stages of its run: `forget` (samples or
statistics → new model), `tune` (α search), `collect` and `merge` (statistics files),
`evaluate` (a model on labelled samples), `layers` (what is projected).

Each function names every option it takes as a keyword argument, so that `help()` and
editors show them; that, not their bodies, is what makes the signatures long.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import InputError, InstallationError
from .forgetting import (
    build_model,
    choose_layers,
    finish,
    head_to_refit,
    json_text,
    score_alphas,
    searches_depth,
)
from .gram import statistic_layers
from .gram_file import ClassStatistics, load_statistics, merge_statistics, statistic_id
from .layer_scan import LayerScan, scan_layers
from .metrics import Accuracy, agreement, confusion, mean_kl_divergence, membership_share
from .modelio import load_model
from .opened import (
    OpenedModel,
    PathArgument,
    Samples,
    check_run_outputs,
    choose_sets,
    destination,
    forget_class_list,
    given_paths,
    optional_path,
    sample_inputs,
    validation_split,
)
from .options import (
    AUTO_DEPTH,
    DEFAULT_ALPHA_F,
    DEFAULT_ALPHA_R,
    DEFAULT_BATCH_SIZE,
    DEFAULT_FORGET_SAMPLES,
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_MODEL_BYTES,
    DEFAULT_MAX_PATCHES,
    DEFAULT_MAX_SAMPLE_BYTES,
    DEFAULT_METHOD,
    DEFAULT_RETAIN_PER_CLASS,
    DEFAULT_SEED,
    ForgetOptions,
    Preprocessing,
)
from .outputs import PLOT_OUTPUT, REPORT_OUTPUT, OutputFiles, check_outputs
from .passes import pass_from_statistics, pass_over_samples, tapped_pass
from .plot import check_matplotlib, evaluation_picture, write_png
from .probe import Readability, readability, scores_and_features
from .report import Report
from .selection import choose_from_class, wanted_classes
from .timing import PhaseTimer

# docs/method.md: the grid the paper searched, scored by retain_acc * (100 - forget_acc).
ALPHA_R_GRID = (10.0, 30.0, 100.0, 300.0, 1000.0)
ALPHA_F_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
ModelArgument = str | os.PathLike | onnx.ModelProto
ClassNames = Sequence[str] | str | os.PathLike | None


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


@dataclass
class Evaluation:
    """A model on labelled samples, optionally against the model it was made from."""

    accuracy: Accuracy
    reference_accuracy: Accuracy | None  # the reference's, on the same samples
    forgotten_classes: list[int]
    confusion: dict[int, dict[int, int]]
    agreement: float | None  # percent of kept-class samples with the reference's top-1
    kl_divergence: float | None  # mean KL(reference || model) on kept-class samples
    membership: dict[str, float] | None  # attack's "member" share of forgotten samples
    # the forgotten classes' readability by a linear probe, for the model and reference
    probe: dict[str, Readability | None] | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def layers(model: ModelArgument, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> LayerScan:
    """The projectable and skipped layers of a model."""
    return scan_layers(load_model(model, max_model_bytes).proto)


def forget(
    model: ModelArgument,
    forget_classes: int | Iterable[int],
    samples: Samples | None = None,
    *,
    stats: PathArgument | ClassStatistics | None = None,
    output: PathArgument | None = None,
    force: bool = False,
    eval_samples: Samples | None = None,
    report: PathArgument | None = None,
    plot: PathArgument | None = None,
    method: str = DEFAULT_METHOD,
    depth: str | int = AUTO_DEPTH,
    alpha_r: float = DEFAULT_ALPHA_R,
    alpha_f: float = DEFAULT_ALPHA_F,
    retain_per_class: int = DEFAULT_RETAIN_PER_CLASS,
    forget_samples: int = DEFAULT_FORGET_SAMPLES,
    max_patches: int = DEFAULT_MAX_PATCHES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    device: str = "auto",
    output_name: str | None = None,
    class_names: ClassNames = None,
    preprocessing: Preprocessing = Preprocessing(),
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
) -> ForgetResult:
    """Forget `forget_classes` in `model`, from `samples` or from collected `stats`.

    A model given by path is written beside itself (or to `output`); a ModelProto is
    written only when `output` is given. `report` writes the report as JSON and `plot` a
    PNG of the accuracy before and after, with the model as one transaction. No output may
    be an input. The options are ForgetOptions' fields (docs/python-api.md).
    """
    settings = ForgetOptions.among(locals())
    classes = forget_class_list(forget_classes)
    if (samples is None) == (stats is None):
        raise InputError("give either samples or stats", ("samples", "stats"))
    if plot is not None:
        check_matplotlib()
        if samples is None and eval_samples is None:
            raise InputError(
                "plot needs samples or eval_samples to compare the models on",
                ("plot", "samples", "eval_samples"),
            )
    timer = PhaseTimer()
    with timer("load"):
        opened = OpenedModel.of(model, settings)
    with timer("samples"):
        sample_set = opened.samples(samples) if samples is not None else None
        written = destination(opened.loaded.path, output, classes)
        others = {"the evaluation samples": eval_samples, "the statistics file": stats}
        check_run_outputs(opened, written, report, force, sample_set, others, plot)
        fit, validation = None, None  # only a depth search holds samples back
        if searches_depth(settings):
            fit, validation = validation_split(opened, sample_set, eval_samples)
        if sample_set is None:
            measured = pass_from_statistics(opened, stats, classes)
        else:
            retain, forget_indices = choose_sets(opened, sample_set, classes, fit)
    if sample_set is not None:
        head = head_to_refit(opened)
        measured = pass_over_samples(opened, sample_set, retain, forget_indices, head, timer)
    alphas = (alpha_r, alpha_f)
    depth = choose_layers(opened, measured, classes, alphas, validation, timer)
    with timer("rewrite"):
        built = build_model(opened, measured, classes, alphas, timer, depth.layers)
    measured = measured.without_spaces()  # evaluation needs the memory the Grams held
    run_report = finish(
        opened, built, measured, classes, alphas, written, eval_samples, report, timer,
        depth=depth, plot_path=plot,
    )  # fmt: skip
    return ForgetResult(built.model, run_report, written)


def tune(
    model: ModelArgument,
    forget_classes: int | Iterable[int],
    samples: Samples,
    *,
    eval_samples: Samples | None = None,
    alpha_r_grid: Iterable[float] = ALPHA_R_GRID,
    alpha_f_grid: Iterable[float] = ALPHA_F_GRID,
    output: PathArgument | None = None,
    force: bool = False,
    report: PathArgument | None = None,
    plot: PathArgument | None = None,
    method: str = DEFAULT_METHOD,
    depth: str | int = AUTO_DEPTH,
    retain_per_class: int = DEFAULT_RETAIN_PER_CLASS,
    forget_samples: int = DEFAULT_FORGET_SAMPLES,
    max_patches: int = DEFAULT_MAX_PATCHES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    device: str = "auto",
    output_name: str | None = None,
    class_names: ClassNames = None,
    preprocessing: Preprocessing = Preprocessing(),
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
) -> TuneResult:
    """Search (α_r, α_f) on a grid, scoring `retain_acc * (100 - forget_acc)` on validation
    samples, and write the best model.

    Validation is `eval_samples` when given, else a seeded share of each class of
    `samples`. The tapped model runs once over the fit samples for the statistics. Under
    depth `auto` the depth is searched first, at the default α. Each grid point then
    factors the Gram matrices at its α, rewrites the weights of those layers, refits the
    head (with the default method: one more run of the fit samples, through the rewritten
    model) and runs the validation samples. `report` and `plot` are written as by `forget`.
    """
    settings = ForgetOptions.among(locals())
    classes = forget_class_list(forget_classes)
    if plot is not None:
        check_matplotlib()
    timer = PhaseTimer()
    with timer("load"):
        opened = OpenedModel.of(model, settings)
    with timer("samples"):
        sample_set = opened.samples(samples)
        written = destination(opened.loaded.path, output, classes)
        others = {"the evaluation samples": eval_samples}
        check_run_outputs(opened, written, report, force, sample_set, others, plot)
        fit, validation = validation_split(opened, sample_set, eval_samples)
        retain, forget_indices = choose_sets(opened, sample_set, classes, fit)
    measured = pass_over_samples(
        opened, sample_set, retain, forget_indices, head_to_refit(opened), timer
    )
    default_alphas = (DEFAULT_ALPHA_R, DEFAULT_ALPHA_F)
    depth = choose_layers(opened, measured, classes, default_alphas, validation, timer)
    with timer("tune"):
        points = [(r, f) for r in alpha_r_grid for f in alpha_f_grid]
        grid = score_alphas(opened, measured, classes, points, validation, timer, depth.layers)
    best = max(grid, key=lambda point: point["score"])
    alphas = (best["alpha_r"], best["alpha_f"])
    with timer("rewrite"):
        built = build_model(opened, measured, classes, alphas, timer, depth.layers)
    measured = measured.without_spaces()
    run_report = finish(
        opened, built, measured, classes, alphas, written, eval_samples, report, timer,
        tuning=grid, depth=depth, plot_path=plot,
    )  # fmt: skip
    return TuneResult(ForgetResult(built.model, run_report, written), grid, best)


def collect(
    model: ModelArgument,
    samples: Samples,
    *,
    classes: Iterable[int] | None = None,
    per_class: int | None = None,
    output: PathArgument | None = None,
    force: bool = False,
    report: PathArgument | None = None,
    max_patches: int = DEFAULT_MAX_PATCHES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    device: str = "auto",
    output_name: str | None = None,
    class_names: ClassNames = None,
    preprocessing: Preprocessing = Preprocessing(),
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
    ray_address: str | None = None,
    ray_workers: int = 2,
) -> ClassStatistics:
    """Gram matrices per statistic and per class, to forget any class later without samples.

    Every sample of each class is used unless `per_class` caps them (seeded choice).
    `output` writes the statistics file and `report` its summary as JSON, together.
    `ray_address` (`local`: a Ray instance started here) runs a folder's samples on Ray
    with `ray_workers` actors, to the same statistics (the `[ray]` extra).
    """
    settings = ForgetOptions.among(locals())
    if ray_address is not None and importlib.util.find_spec("ray") is None:
        raise InstallationError("--ray needs Ray: pip install 'onnx-forget[ray]'")
    opened = OpenedModel.of(model, settings)
    sample_set = opened.samples(samples)
    outputs = {"statistics file": optional_path(output), REPORT_OUTPUT: optional_path(report)}
    check_outputs(outputs, {**opened.inputs, **sample_inputs(sample_set, settings)}, force)
    if ray_address is None:
        statistics = _collect_here(opened, sample_set, classes, per_class)
    else:
        from .ray import collect_folder

        statistics = collect_folder(
            opened, sample_set, ray_address, ray_workers, classes, per_class
        )
    _write_statistics(statistics, *outputs.values())
    return statistics


def _collect_here(opened: OpenedModel, sample_set, classes, per_class) -> ClassStatistics:
    """`collect` in this process: one pass of the tapped model, a set per class."""
    wanted = wanted_classes(sample_set.labels, classes, sample_set.origin)
    cap = per_class if per_class is not None else len(sample_set)
    sets = {
        str(label): choose_from_class(sample_set.labels, label, cap, opened.settings.seed)
        for label in wanted
    }
    collector, _ = tapped_pass(opened, opened.tapped_runner(), sample_set, sets)
    grams, vectors = {}, {}
    for number, key in enumerate(collector.accumulators):
        for label in wanted:
            accumulator = collector.accumulators[key][str(label)]
            grams[number, label] = accumulator.gram
            vectors[number, label] = accumulator.vectors
    samples_per_class = {label: len(sets[str(label)]) for label in wanted}
    return class_statistics(opened, grams, vectors, samples_per_class)


def class_statistics(opened: OpenedModel, grams, vectors, samples_per_class) -> ClassStatistics:
    """The statistics of a model's run, with the identity and options that shaped them."""
    return ClassStatistics(
        model_sha256=opened.loaded.sha256,
        statistics=[statistic_id(layer) for layer in statistic_layers(opened.scan.layers)],
        options=_statistics_options(opened.settings),
        samples=samples_per_class,
        grams=grams,
        vectors=vectors,
    )


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
    outputs = {"statistics file": optional_path(output), REPORT_OUTPUT: optional_path(report)}
    check_outputs(outputs, {"a statistics file to merge": paths}, force)
    statistics = merge_statistics([load_statistics(p) for p in paths], [str(p) for p in paths])
    _write_statistics(statistics, *outputs.values())
    return statistics


def evaluate(
    model: ModelArgument,
    samples: Samples,
    *,
    reference: ModelArgument | None = None,
    forget_classes: Iterable[int] | None = None,
    members: Samples | None = None,
    report: PathArgument | None = None,
    plot: PathArgument | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    device: str = "auto",
    output_name: str | None = None,
    class_names: ClassNames = None,
    preprocessing: Preprocessing = Preprocessing(),
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> Evaluation:
    """Accuracy per class, where forgotten samples go, agreement with `reference`, and —
    with `members` (samples the model was trained on) — the membership-inference share
    of the forgotten classes' member samples, for the model and the reference.

    Forgotten classes default to what the model's metadata records. `report` writes the
    evaluation as JSON, `plot` a PNG of it (the reference's accuracy as "before").
    """
    settings = ForgetOptions.among(locals())
    if plot is not None:
        check_matplotlib()
    opened = OpenedModel.of(model, settings, projected=False)
    other = None if reference is None else OpenedModel.of(reference, settings, projected=False)
    held_out = opened.samples(samples)
    inputs = {
        **(other.inputs if other else {}),
        **opened.inputs,
        **sample_inputs(held_out, settings),
        "the member samples": given_paths(members),
    }
    outputs = {REPORT_OUTPUT: optional_path(report), PLOT_OUTPUT: optional_path(plot)}
    check_outputs(outputs, inputs, force=False)
    if forget_classes is None:
        forget_classes = _recorded_classes(opened)
    classes = sorted({int(c) for c in forget_classes})
    everything = np.arange(len(held_out))
    scores, features = scores_and_features(opened, opened.loaded.proto, held_out, everything)
    predictions = np.argmax(scores, axis=1)
    result = Evaluation(
        accuracy=Accuracy.of(held_out.labels, predictions, classes),
        reference_accuracy=None,
        forgotten_classes=classes,
        confusion=confusion(held_out.labels, predictions, classes),
        agreement=None,
        kl_divergence=None,
        membership=None,
        probe=None,
    )
    held_scores, held_features = {"model": scores}, {"model": features}
    if other is not None:
        kept = ~np.isin(held_out.labels, classes)
        held_scores["reference"], held_features["reference"] = scores_and_features(
            other, other.loaded.proto, held_out, everything
        )
        reference_predictions = np.argmax(held_scores["reference"], axis=1)
        result.reference_accuracy = Accuracy.of(held_out.labels, reference_predictions, classes)
        result.agreement = agreement(scores[kept], held_scores["reference"][kept])
        result.kl_divergence = mean_kl_divergence(scores[kept], held_scores["reference"][kept])
    probes = {
        name: readability(values, held_out.labels, classes, settings.seed)
        for name, values in held_features.items()
        if values is not None
    }
    if any(probes.values()):
        result.probe = probes
    if members is not None:
        member_set = opened.samples(members)
        models = {"model": opened, "reference": other}
        result.membership = {}
        for name, held in held_scores.items():
            member_scores = models[name].original_scores(member_set)
            result.membership[name] = membership_share(
                member_scores, member_set.labels, held, held_out.labels, classes
            )
    with OutputFiles() as files:
        if report is not None:
            files.add_text(Path(report), json_text(result.to_dict()))
        if plot is not None:
            picture = evaluation_picture(result, opened)
            files.add_file(Path(plot), lambda stream: write_png(picture, stream))
        files.commit()
    return result


def _recorded_classes(opened: OpenedModel) -> list[int]:
    """The classes a model's metadata says were forgotten in it."""
    props = {p.key: p.value for p in opened.loaded.proto.metadata_props}
    return [int(c) for c in props.get("onnx_forget.forgotten_classes", "").split(",") if c]


def _write_statistics(statistics: ClassStatistics, path: Path | None, report: Path | None):
    """The statistics file and the JSON summary of it, as one transaction."""
    with OutputFiles() as files:
        if path is not None:
            files.add_file(path, statistics.write)
        if report is not None:
            summary = statistics.summary(str(path) if path else None)
            files.add_text(report, json_text(summary))
        files.commit()


def _statistics_options(settings: ForgetOptions) -> dict:
    """The options that shape statistics: files must agree on them to be combined."""
    return {
        "max_patches": settings.max_patches,
        "seed": settings.seed,
        "preprocessing": dataclasses.asdict(settings.preprocessing),
        "output_name": settings.output_name,
    }
