"""The public entry points: `forget` strings the data's path together, `layers` lists."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import InputError, UnsupportedModelError
from .evaluate import Accuracy, predict
from .layers import LayerScan, scan_layers
from .modelio import load_model, needs_external_data, save_model_atomically
from .options import ForgetOptions
from .report import Comparison, Report, layer_rows
from .rewrite import rewrite_model
from .runtime import open_runner
from .samples import SampleSet, open_samples, select_samples
from .signature import read_signature
from .statistics import StatisticsCollector
from .subspace import projections
from .taps import add_taps, tap_names
from .verify import verify_file, verify_model
from .version import VERSION

RETAIN, FORGET = "retain", "forget"


@dataclass
class ForgetResult:
    """The rewritten model and the report of the run that made it."""

    model: onnx.ModelProto
    report: Report
    output: Path | None


class _PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def layers(model: str | os.PathLike | onnx.ModelProto) -> LayerScan:
    """The projectable and skipped layers of a model."""
    return scan_layers(load_model(model).proto)


def default_output(model_path: Path, forget_classes: list[int]) -> Path:
    """`<stem>.forget-<classes>.onnx` beside the input."""
    classes = "-".join(str(c) for c in forget_classes)
    return model_path.with_name(f"{model_path.stem}.forget-{classes}.onnx")


def forget(
    model: str | os.PathLike | onnx.ModelProto,
    forget_classes: int | Iterable[int],
    samples: str | os.PathLike | tuple[np.ndarray, np.ndarray],
    *,
    output: str | os.PathLike | None = None,
    force: bool = False,
    eval_samples: str | os.PathLike | tuple[np.ndarray, np.ndarray] | None = None,
    **options,
) -> ForgetResult:
    """Forget `forget_classes` in `model`, learning the subspaces from `samples`.

    A model given by path is written beside itself (or to `output`); a ModelProto is
    written only when `output` is given. Keyword options are the fields of ForgetOptions.
    """
    settings = ForgetOptions.from_keywords(**options)
    classes = sorted(
        {int(c) for c in ([forget_classes] if np.isscalar(forget_classes) else forget_classes)}
    )
    if not classes:
        raise InputError("name at least one class to forget")
    timer = _PhaseTimer()
    with timer("load"):
        loaded = load_model(model)
        destination = _destination(loaded.path, output, classes, force)
        signature = read_signature(loaded.proto, settings.output_name)
        scan = scan_layers(loaded.proto)
        if not scan.layers:
            raise UnsupportedModelError("the model has no projectable Conv, Gemm or MatMul layer")
    with timer("samples"):
        sample_set = open_samples(samples, signature, settings.preprocessing, settings.class_names)
        retain, forget_indices = _choose_sets(sample_set, classes, signature.class_count, settings)
    with timer("taps"):
        tapped = add_taps(loaded.proto, scan.layers, signature.scores_name)
        runner = open_runner(
            tapped,
            settings.device,
            settings.batch_size,
            signature.fixed_batch,
            signature.input_name,
        )
    with timer("collect"):
        collector = StatisticsCollector(
            scan.layers,
            {RETAIN: sample_set.labels[retain], FORGET: sample_set.labels[forget_indices]},
            settings.max_patches,
            settings.seed,
        )
        outputs = [signature.scores_name, *tap_names(scan.layers)]
        before = {}
        for set_name, indices in ((RETAIN, retain), (FORGET, forget_indices)):
            done = 0
            for batch, values in runner.run(sample_set.load, indices, outputs):
                collector.add(set_name, dict(zip(outputs, values)), done)
                before.update(zip(batch.tolist(), np.argmax(values[0], axis=1).tolist()))
                done += len(batch)
    with timer("decompose"):
        projected = {
            key: projections(
                collector.gram(key, RETAIN),
                collector.gram(key, FORGET),
                settings.alpha_r,
                settings.alpha_f,
            )
            for key in collector.accumulators
        }
    with timer("rewrite"):
        metadata = {
            "onnx_forget.forgotten_classes": ",".join(map(str, classes)),
            "onnx_forget.alpha_r": repr(settings.alpha_r),
            "onnx_forget.alpha_f": repr(settings.alpha_f),
            "onnx_forget.samples": f"retain={len(retain)},forget={len(forget_indices)}",
            "onnx_forget.source_sha256": loaded.sha256,
            "onnx_forget.version": VERSION,
        }
        new_model, copies = rewrite_model(loaded.proto, scan.layers, projected, metadata)
    with timer("save"):
        if destination is None:
            verify_model(new_model, loaded.proto)
        else:
            save_model_atomically(
                new_model,
                destination,
                needs_external_data(new_model, loaded.has_external_data),
                lambda staged: verify_file(staged, loaded.proto),
            )
    with timer("evaluate"):
        comparisons = _compare(
            loaded.proto,
            new_model,
            signature,
            settings,
            sample_set,
            retain,
            forget_indices,
            before,
            classes,
            eval_samples,
        )
    report = Report(
        model=str(loaded.path) if loaded.path else "(in memory)",
        output=str(destination) if destination else None,
        forgotten_classes=classes,
        options=_options_dict(settings),
        provider=runner.provider,
        provider_note=runner.provider_note,
        layers=layer_rows(LayerScan(scan.layers, ())),
        skipped_layers=layer_rows(LayerScan((), scan.skipped)),
        copied_weights=copies,
        samples={
            "origin": sample_set.origin,
            "retain": len(retain),
            "forget": len(forget_indices),
            "skipped_files": sample_set.skipped_files,
        },
        comparisons=comparisons,
        timings=timer.seconds,
    )
    return ForgetResult(new_model, report, destination)


def _destination(model_path: Path | None, output, classes: list[int], force: bool) -> Path | None:
    """Where to write, refusing the input itself and, without `force`, existing files."""
    if output is None:
        if model_path is None:
            return None
        output = default_output(model_path, classes)
    output = Path(output)
    if model_path is not None and output.resolve() == model_path.resolve():
        raise InputError(f"{output}: refusing to overwrite the input model")
    if output.is_dir():
        raise InputError(f"{output}: is a folder, not a file name")
    if output.exists() and not force:
        raise InputError(f"{output}: already exists (use --force to replace it)")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: output folder does not exist")
    return output


def _choose_sets(
    sample_set: SampleSet,
    classes: list[int],
    class_count: int | None,
    settings: ForgetOptions,
) -> tuple[np.ndarray, np.ndarray]:
    """Check the classes against model and samples, then pick retain and forget samples."""
    if class_count is not None:
        beyond = [c for c in classes if c >= class_count] + sorted(
            {int(label) for label in sample_set.labels if label >= class_count}
        )
        if beyond:
            raise InputError(
                f"class {beyond[0]} does not exist: the model has {class_count} classes (0.."
                f"{class_count - 1})"
            )
    present = set(np.unique(sample_set.labels).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise InputError(f"{sample_set.origin}: no samples of class {missing[0]} to forget")
    retain, forget_indices = select_samples(
        sample_set.labels,
        classes,
        settings.retain_per_class,
        settings.forget_samples,
        settings.seed,
    )
    if not len(retain):
        raise InputError("no samples of a class to keep: cannot forget every class")
    return retain, forget_indices


def _compare(
    original,
    new_model,
    signature,
    settings,
    sample_set,
    retain,
    forget_indices,
    before,
    classes,
    eval_samples,
) -> list[Comparison]:
    """Accuracy before and after on the samples used and, if given, on a held-out set."""

    def runner_for(model):
        return open_runner(
            model,
            settings.device,
            settings.batch_size,
            signature.fixed_batch,
            signature.input_name,
        )

    new_runner = runner_for(new_model)
    used = np.concatenate([retain, forget_indices])
    labels = sample_set.labels[used]
    before_predictions = np.array([before[i] for i in used.tolist()])
    after_predictions = predict(new_runner, sample_set, used, signature.scores_name)
    comparisons = [
        Comparison(
            "samples",
            Accuracy.of(labels, before_predictions, classes),
            Accuracy.of(labels, after_predictions, classes),
        )
    ]
    if eval_samples is not None:
        held_out = open_samples(
            eval_samples, signature, settings.preprocessing, settings.class_names
        )
        everything = np.arange(len(held_out))
        original_runner = runner_for(original)
        comparisons.append(
            Comparison(
                "eval",
                Accuracy.of(
                    held_out.labels,
                    predict(original_runner, held_out, everything, signature.scores_name),
                    classes,
                ),
                Accuracy.of(
                    held_out.labels,
                    predict(new_runner, held_out, everything, signature.scores_name),
                    classes,
                ),
            )
        )
    return comparisons


def _options_dict(settings: ForgetOptions) -> dict:
    values = dataclasses.asdict(settings)
    values.pop("progress")
    return values
