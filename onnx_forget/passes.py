"""Where a run's Gram matrices come from: one pass of the tapped model over the retain and
forget samples, or a statistics file. Each hands on a frozen `SamplePass`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np

from .errors import InputError
from .gram import StatisticsCollector, statistic_layers
from .gram_file import ClassStatistics, load_statistics, statistic_id
from .integer_layers import dequantized
from .layer_scan import Head
from .opened import OpenedModel
from .probe import head_features
from .progress import progress_bar
from .runtime import Runner, SampleRows
from .samples import SampleSet
from .subspace import SpacePair
from .timing import PhaseTimer

RETAIN, FORGET = "retain", "forget"
LOGITS, FEATURES = "head logits", "head features"  # what a pass keeps besides the scores
FROM_STATISTICS = "none (statistics file)"  # the provider of a run that ran no model


@dataclass(frozen=True)
class FitSamples:
    """The samples a run fitted on, retain then forget, with the original model's outputs."""

    samples: SampleSet
    indices: np.ndarray  # [n] into `samples`
    scores: np.ndarray  # [n, C] the original scores
    head: Head | None  # the head to refit, when its logits were collected
    head_logits: np.ndarray | None  # [n, C] the original head's logits
    head_problem: str | None = None  # why collected logits cannot be refitted
    features: np.ndarray | None = None  # [n, d] the original head's input, for the probe

    @property
    def labels(self) -> np.ndarray:
        return self.samples.labels[self.indices]


@dataclass(frozen=True)
class SamplePass:
    """What a run measured: each statistic's retain and forget Gram matrices, how many
    samples made them, where they ran, and (from samples only) the fit samples."""

    spaces: Mapping[tuple, SpacePair]
    counts: dict  # origin, retain, forget, skipped_files
    provider: str
    provider_note: str | None
    fit: FitSamples | None
    covered_classes: tuple[int, ...]  # the classes the samples or statistics hold

    def without_spaces(self) -> SamplePass:
        """The same pass without its Gram matrices, once the weights are rewritten."""
        return dataclasses.replace(self, spaces={})


def tapped_pass(
    opened: OpenedModel,
    runner: Runner,
    sample_set: SampleSet,
    sets: dict[str, np.ndarray],
    kept: Mapping[str, Callable[[dict[str, np.ndarray]], np.ndarray]] | None = None,
) -> tuple[StatisticsCollector, dict[str, np.ndarray]]:
    """One pass of the tapped model over each set: its Gram matrices, and the scores and
    what each of `kept` takes from a batch's named outputs, `[n, ...]` each over the
    sets' samples in order."""
    settings = opened.settings
    collector = StatisticsCollector(
        opened.scan.layers,
        {name: sample_set.labels[indices] for name, indices in sets.items()},
        settings.max_patches,
        settings.seed,
        runner.gram_update,
    )
    outputs = [o.name for o in runner.session.get_outputs()]
    scores_name = opened.signature.scores_name
    keep = {scores_name: lambda named: named[scores_name], **(kept or {})}
    total = sum(len(indices) for indices in sets.values())
    rows = {key: SampleRows(total) for key in keep}
    with progress_bar(total, "collecting", settings.progress) as bar:
        for name, indices in sets.items():
            done = 0
            for batch, values in runner.run(sample_set.load, indices, outputs):
                named = dict(zip(outputs, values))
                collector.add(name, named, done)
                for key, take in keep.items():
                    rows[key].add(take(named))
                done += len(batch)
                bar.update(len(batch))
                del values, named  # not alive while the next batch runs
    return collector, {key: kept_rows.result() for key, kept_rows in rows.items()}


def pass_over_samples(
    opened: OpenedModel,
    sample_set: SampleSet,
    retain: np.ndarray,
    forget: np.ndarray,
    head: Head | None,
    timer: PhaseTimer,
) -> SamplePass:
    """Run the tapped model once over both sets, keeping `head`'s logits when given and
    the features the model's head sees, for the probe."""
    kept, tapped = {}, ()
    if head is not None:
        logits_dtype = head.logits_dtype or head.layer.weight_dtype
        tapped = ((head.logits, logits_dtype),)
        kept[LOGITS] = lambda named: named[head.logits]
    probe_head = opened.head()
    if probe_head is not None:
        kept[FEATURES] = partial(head_features, probe_head.layer)
    with timer("taps"):
        runner = opened.tapped_runner(tapped)
    with timer("collect"):
        collector, kept = tapped_pass(
            opened, runner, sample_set, {RETAIN: retain, FORGET: forget}, kept
        )
        spaces = {
            key: SpacePair(
                sets[RETAIN].statistic, sets[FORGET].statistic, sets[RETAIN].kernel_major
            )
            for key, sets in collector.accumulators.items()
        }

    head_logits = dequantized(kept[LOGITS], head.logits_dequantization) if head else None
    expected = (len(retain) + len(forget), opened.signature.class_count)
    problem = None
    if head_logits is not None and head_logits.shape != expected:
        problem = (
            f"the head {head.layer.node!r} writes logits of shape "
            f"[n, {', '.join(map(str, head_logits.shape[1:]))}], not one row of "
            f"{expected[1]} per sample"
        )
    fit = FitSamples(
        samples=sample_set,
        indices=np.concatenate([retain, forget]),
        scores=kept[opened.signature.scores_name],
        head=head if problem is None else None,
        head_logits=head_logits if problem is None else None,
        head_problem=problem,
        features=kept.get(FEATURES),
    )
    counts = {
        "origin": sample_set.origin,
        "retain": len(retain),
        "forget": len(forget),
        "skipped_files": sample_set.skipped_files,
        "batch": {"size": runner.batch_size, "why": runner.batch_reason},
    }
    covered = tuple(int(c) for c in np.unique(fit.labels))
    return SamplePass(spaces, counts, runner.provider, runner.provider_note, fit, covered)


def pass_from_statistics(
    opened: OpenedModel, stats: str | ClassStatistics, classes: list[int]
) -> SamplePass:
    """The retain and forget Gram matrices as sums of a statistics file's classes."""
    statistics = stats if isinstance(stats, ClassStatistics) else load_statistics(stats)
    kept = check_statistics(statistics, opened, classes, stats)
    spaces = {
        layer.statistic_key: SpacePair(
            statistics.summed(number, kept), statistics.summed(number, classes)
        )
        for number, layer in enumerate(statistic_layers(opened.scan.layers))
    }
    counts = {
        "origin": str(stats) if not isinstance(stats, ClassStatistics) else "(statistics)",
        "retain": sum(statistics.samples[c] for c in kept),
        "forget": sum(statistics.samples[c] for c in classes),
        "skipped_files": 0,
    }
    covered = tuple(sorted({*kept, *classes}))
    return SamplePass(spaces, counts, FROM_STATISTICS, None, None, covered)


def check_statistics(statistics: ClassStatistics, opened: OpenedModel, classes, origin):
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
