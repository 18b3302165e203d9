"""From a `SamplePass` to a written model: choose the method, project and rewrite the
weights, refit the head, compare before and after, then write model and report together."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from .depth import DepthChoice, choose_depth, last_layers
from .layer_scan import Head, Layer, LayerScan
from .metrics import Accuracy, agreement, confusion, membership_share
from .modelio import LoadedModel
from .opened import OpenedModel, PathArgument, Samples
from .options import AUTO_DEPTH, METHODS, ForgetOptions
from .outputs import OutputFiles, needs_external_data
from .passes import SamplePass
from .plot import forget_picture, write_png
from .probe import readability, scores_and_features
from .repair import repair_head
from .report import Comparison, Report, layer_rows
from .rewrite import Rewritten, rewrite_model
from .samples import SampleSet
from .subspace import Projections
from .timing import PhaseTimer
from .verify import verify_file, verify_model
from .version import VERSION

REPAIR, PAPER = METHODS


@dataclass(frozen=True)
class Method:
    """The method a run applies, and why it is not the one asked for when it is not."""

    name: str
    note: str | None = None


def choose_method(settings: ForgetOptions, measured: SamplePass) -> Method:
    """The head repair needs fit samples and a head whose logits could be refitted."""
    if settings.method == PAPER:
        return Method(PAPER)
    fit = measured.fit
    if fit is not None and fit.head_logits is not None:
        return Method(REPAIR)
    if fit is None:
        reason = "a statistics file holds no samples to refit the head with"
    else:
        reason = fit.head_problem or (
            "no fully connected layer with one output per class feeds the scores"
        )
    return Method(PAPER, f"head repair skipped: {reason}; the paper's method was applied")


def build_model(
    opened: OpenedModel,
    measured: SamplePass,
    classes: list[int],
    alphas: tuple[float, float],
    timer: PhaseTimer,
    layers: tuple[Layer, ...] | None = None,
) -> Rewritten:
    """The model with `layers` (default: every layer) projected, its head refitted when the
    method allows; the names of the weight copies made for shared weights, and the
    quantized channels rescaled."""
    alpha_r, alpha_f = alphas
    metadata = provenance(opened.loaded, classes, alpha_r, alpha_f, measured.counts)
    projections = Projections(measured.spaces, alpha_r, alpha_f, lambda: timer("decompose"))
    layers = opened.scan.layers if layers is None else layers
    built = rewrite_model(opened.loaded.proto, layers, projections.factor, metadata)
    if choose_method(opened.settings, measured).name != REPAIR:
        return built
    model, rescaled = repair_head(opened, built.model, measured.fit, classes)
    return Rewritten(model, built.copies, built.rescaled_channels + rescaled)


def score_alphas(
    opened: OpenedModel,
    measured: SamplePass,
    classes: list[int],
    points: list[tuple[float, float]],
    validation: tuple[SampleSet, np.ndarray],
    timer: PhaseTimer,
    layers: tuple[Layer, ...],
) -> list[dict]:
    """Each (α_r, α_f) of `points` built in memory on `layers` and scored on the
    validation samples by `retain_acc * (100 - forget_acc)`, the paper's criterion."""
    validation, indices = validation
    labels = validation.labels[indices]
    grid = []
    for alpha_r, alpha_f in points:
        alphas = (alpha_r, alpha_f)
        candidate = build_model(opened, measured, classes, alphas, timer, layers).model
        scores = opened.scores(opened.runner(candidate), validation, indices)
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
    return grid


def head_to_refit(opened: OpenedModel) -> Head | None:
    """The head whose logits a pass over the samples must keep: only the head repair
    refits one."""
    return opened.head() if opened.settings.method == REPAIR else None


def finish(
    opened: OpenedModel,
    built: Rewritten,
    measured: SamplePass,
    classes: list[int],
    alphas: tuple[float, float],
    written: Path | None,
    eval_samples: Samples | None,
    report_path: PathArgument | None,
    timer: PhaseTimer,
    tuning: list[dict] | None = None,
    depth: DepthChoice | None = None,
    plot_path: PathArgument | None = None,
) -> Report:
    """Evaluate the `built` model and its weight copies, then stage and verify the model,
    the report and the plot and rename them into place. Evaluating first means a bad
    evaluation file or a Ctrl-C while evaluating leaves no output behind."""
    new_model, copies, rescaled_channels = built
    with timer("evaluate"):
        comparisons, where, membership, probe = compare(
            opened, new_model, measured, classes, eval_samples
        )
    with OutputFiles() as files:
        with timer("save"):
            if written is None:
                verify_model(new_model, opened.loaded.proto)
            else:
                files.add_model(
                    new_model,
                    written,
                    needs_external_data(new_model, opened.loaded.has_external_data),
                    lambda staged: verify_file(staged, opened.loaded.proto),
                )
        method = choose_method(opened.settings, measured)
        report = Report(
            model=opened.loaded.where if opened.loaded.path else "(in memory)",
            output=str(written) if written else None,
            forgotten_classes=classes,
            options=_report_options(opened.settings, method, alphas),
            provider=measured.provider,
            provider_note=measured.provider_note,
            layers=layer_rows(LayerScan(depth.layers if depth else opened.scan.layers, ())),
            skipped_layers=layer_rows(LayerScan((), opened.scan.skipped)),
            copied_weights=copies,
            rescaled_channels=rescaled_channels,
            samples=measured.counts,
            comparisons=comparisons,
            timings=timer.seconds,
            confusion=where,
            membership=membership,
            probe=probe,
            notes=_notes(opened, measured, method, comparisons),
            tuning=tuning,
            depth=depth.to_dict(len(opened.scan.layers)) if depth else None,
        )
        if report_path is not None:
            files.add_text(Path(report_path), json_text(report.to_dict()))
        if plot_path is not None:
            picture = forget_picture(report, opened)
            files.add_file(Path(plot_path), lambda stream: write_png(picture, stream))
        files.commit()
    return report


def compare(
    opened: OpenedModel,
    new_model: onnx.ModelProto,
    measured: SamplePass,
    classes: list[int],
    eval_samples: Samples | None,
):
    """Before/after accuracy on the fit samples and on `eval_samples`, where the forgotten
    samples now go, with both sets the membership-inference share of the forgotten
    samples, and the probe's readability of the forgotten classes on the last set."""
    comparisons, where, membership, probe = [], None, None, None
    fit, after_fit = measured.fit, None
    covered = measured.covered_classes
    if fit is not None:
        after_fit, features = scores_and_features(opened, new_model, fit.samples, fit.indices)
        comparisons.append(
            _comparison("samples", fit.labels, fit.scores, after_fit, classes, covered)
        )
        where = confusion(fit.labels, np.argmax(after_fit, 1), classes)
        probe = _probe("samples", fit.labels, fit.features, features, classes, opened)
    if eval_samples is None:
        return comparisons, where, membership, probe
    held_out = opened.samples(eval_samples)
    everything = np.arange(len(held_out))
    before, features_before = scores_and_features(opened, opened.loaded.proto, held_out, everything)
    after, features_after = scores_and_features(opened, new_model, held_out, everything)
    comparisons.append(_comparison("eval", held_out.labels, before, after, classes, covered))
    where = confusion(held_out.labels, np.argmax(after, 1), classes)
    probe = _probe("eval", held_out.labels, features_before, features_after, classes, opened)
    if fit is not None:
        membership = {
            name: membership_share(member, fit.labels, held, held_out.labels, classes)
            for name, member, held in (("before", fit.scores, before), ("after", after_fit, after))
        }
    return comparisons, where, membership, probe


def _probe(name, labels, before, after, classes, opened) -> dict | None:
    """The probe's readability of the forgotten classes on one set, before and after."""
    if before is None or after is None:
        return None
    seed = opened.settings.seed
    readable = [readability(features, labels, classes, seed) for features in (before, after)]
    if None in readable:
        return None
    return {"set": name, "before": asdict(readable[0]), "after": asdict(readable[1])}


def _report_options(settings: ForgetOptions, method: Method, alphas) -> dict:
    """The options as the report shows them, with the α and the method really applied."""
    options = settings_dict(settings)
    options.update(alpha_r=float(alphas[0]), alpha_f=float(alphas[1]), method=method.name)
    return options


def _notes(opened: OpenedModel, measured: SamplePass, method: Method, comparisons):
    """What a pipeline should know about the run, one sentence each."""
    notes = (
        _coverage(opened, measured),
        _fixed_batch(opened),
        method.note,
        _still_predicted(opened, comparisons),
    )
    return [note for note in notes if note]


def _coverage(opened: OpenedModel, measured: SamplePass) -> str | None:
    """Say plainly when the samples leave classes of the model out: the projection keeps
    what the samples show, and of the other classes only what it happens not to remove."""
    count = opened.signature.class_count
    covered = len(measured.covered_classes)
    if not count or covered >= count:
        return None
    return (
        f"samples cover {covered} of {count} classes; the other {count - covered} are "
        "protected only by the projection's restraint"
    )


def _fixed_batch(opened: OpenedModel) -> str | None:
    """Say how a fixed-batch model ran: at the run's batch size through a copy with a
    symbolic batch, or at its own, and why."""
    fixed = opened.signature.fixed_batch
    if fixed is None:
        return None
    if opened.fixed_batch_kept is None:
        return (
            f"the model's fixed batch of {fixed} was made symbolic for the run (its outputs "
            f"checked against the original's); the written model keeps batch {fixed}"
        )
    return f"the model ran at its fixed batch of {fixed}: {opened.fixed_batch_kept}"


def _still_predicted(opened: OpenedModel, comparisons: list[Comparison]) -> str | None:
    """Say so when forgotten samples used still get their class as top-1, and why that
    may be: scores quantized with a calibrated range can clip the forgotten logits."""
    used = next((c for c in comparisons if c.name == "samples"), None)
    if used is None or not used.after.forget > 0:
        return None
    why = ""
    if opened.scores_quantized:
        why = (
            "; the scores pass through QuantizeLinear, whose calibrated range may clip "
            "the forgotten classes' logits to a tie"
        )
    return (
        f"{used.after.forget:.1f}% of the forgotten classes' samples used still get their "
        f"class as top-1{why}"
    )


def _comparison(name, labels, before, after, classes, covered) -> Comparison:
    """Accuracy before and after, and the share of kept samples that keep their original
    top-1: all of them, and those whose original top-1 is a class the samples leave out."""
    original = np.argmax(before, axis=1)
    kept = ~np.isin(labels, classes)
    uncovered = kept & ~np.isin(original, covered)
    return Comparison(
        name,
        Accuracy.of(labels, original, classes),
        Accuracy.of(labels, np.argmax(after, axis=1), classes),
        agreement=agreement(after[kept], before[kept]),
        uncovered=(
            {
                "samples": int(uncovered.sum()),
                "agreement": agreement(after[uncovered], before[uncovered]),
            }
            if uncovered.any()
            else None
        ),
    )


def provenance(loaded: LoadedModel, classes, alpha_r, alpha_f, counts) -> dict[str, str]:
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


def settings_dict(settings: ForgetOptions) -> dict:
    """The options as the report shows them."""
    values = dataclasses.asdict(settings)
    values.pop("progress")
    if isinstance(settings.class_names, os.PathLike):  # a file of names: its path, as text
        values["class_names"] = str(settings.class_names)
    return values


def json_text(document: dict) -> str:
    """A report as the JSON text written to `--report` files."""
    return json.dumps(document, indent=2) + "\n"


def choose_layers(opened, measured, classes, alphas, validation, timer) -> DepthChoice:
    """The layers to project: searched on the validation samples for `auto`, else the
    last N or every one. The paper's method, or a run with nothing to validate on,
    projects every layer under `auto`."""
    depth = opened.settings.depth
    if depth != AUTO_DEPTH:
        return DepthChoice(last_layers(opened, depth), (), f"depth {depth}, as asked")
    if not searches_depth(opened.settings):
        return DepthChoice(opened.scan.layers, (), "the paper's method projects every layer")
    if validation is None:
        return DepthChoice(opened.scan.layers, (), "no samples to validate a depth on")

    def build(layers):
        return build_model(opened, measured, classes, alphas, timer, layers).model

    with timer("depth"):
        return choose_depth(opened, build, classes, *validation)


def searches_depth(settings: ForgetOptions) -> bool:
    """Whether a run searches its depth (and so holds validation samples back): `auto`
    with the head repair."""
    return settings.depth == AUTO_DEPTH and settings.method == REPAIR
