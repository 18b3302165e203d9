"""Where a run's Gram matrices come from: one pass of the tapped model over the retain and
forget samples, or a statistics file. Each hands on a frozen `SamplePass`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .gram import StatisticsCollector, statistic_layers
from .gram_file import ClassStatistics, load_statistics, statistic_id
from .integer_layers import dequantized
from .layer_scan import Head
from .opened import OpenedModel
from .progress import progress_bar
from .runtime import Runner
from .samples import SampleSet
from .subspace import SpacePair
from .timing import PhaseTimer

RETAIN, FORGET = "retain", "forget"
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

    def without_spaces(self) -> SamplePass:
        """The same pass without its Gram matrices, once the weights are rewritten."""
        return dataclasses.replace(self, spaces={})


def tapped_pass(
    opened: OpenedModel,
    runner: Runner,
    sample_set: SampleSet,
    sets: dict[str, np.ndarray],
    kept: tuple[str, ...] = (),
) -> tuple[StatisticsCollector, dict[str, dict[str, np.ndarray]]]:
    """One pass of the tapped model over each set: its Gram matrices, and per set the
    scores and the `kept` tensors, `[n, ...]` each in set order."""
    settings = opened.settings
    collector = StatisticsCollector(
        opened.scan.layers,
        {name: sample_set.labels[indices] for name, indices in sets.items()},
        settings.max_patches,
        settings.seed,
        runner.gram_products,
    )
    outputs = [o.name for o in runner.session.get_outputs()]
    keep = list(dict.fromkeys([opened.signature.scores_name, *kept]))
    values_by_set = {}
    total = sum(len(indices) for indices in sets.values())
    with progress_bar(total, "collecting", settings.progress) as bar:
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


def pass_over_samples(
    opened: OpenedModel,
    sample_set: SampleSet,
    retain: np.ndarray,
    forget: np.ndarray,
    head: Head | None,
    timer: PhaseTimer,
) -> SamplePass:
    """Run the tapped model once over both sets, keeping `head`'s logits when given."""
    logits = ((head.logits, head.logits_dtype or head.layer.weight_dtype),) if head else ()
    with timer("taps"):
        runner = opened.tapped_runner(logits)
    with timer("collect"):
        collector, kept = tapped_pass(
            opened,
            runner,
            sample_set,
            {RETAIN: retain, FORGET: forget},
            tuple(name for name, _ in logits),
        )
    spaces = {
        key: SpacePair(collector.gram(key, RETAIN), collector.gram(key, FORGET))
        for key in collector.accumulators
    }

    def both(tensor: str) -> np.ndarray:
        return np.concatenate([kept[RETAIN][tensor], kept[FORGET][tensor]])

    head_logits = dequantized(both(head.logits), head.logits_dequantization) if head else None
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
        scores=both(opened.signature.scores_name),
        head=head if problem is None else None,
        head_logits=head_logits if problem is None else None,
        head_problem=problem,
    )
    counts = {
        "origin": sample_set.origin,
        "retain": len(retain),
        "forget": len(forget),
        "skipped_files": sample_set.skipped_files,
    }
    return SamplePass(spaces, counts, runner.provider, runner.provider_note, fit)


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
    return SamplePass(spaces, counts, FROM_STATISTICS, None, None)


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
