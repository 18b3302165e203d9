"""The `--plot` picture of a run: accuracy before and after, where the forgotten samples
go, and whether a linear probe still reads them. matplotlib is an optional extra, so it
is imported only while a picture is drawn."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from .errors import InstallationError
from .metrics import Accuracy
from .samples import read_class_names

if TYPE_CHECKING:
    from .api import Evaluation
    from .opened import OpenedModel
    from .report import Report

MISSING_MATPLOTLIB = "--plot needs matplotlib: pip install 'onnx-forget[plot]'"
PER_CLASS, MANY_CLASSES = "per class", "many classes"
MAX_CLASS_BARS = 30  # beyond this, bars per class are too thin to read
TOP_DESTINATIONS = 5
MIN_SLOTS = 4  # bar slots an axis keeps, so that one bar is not a wall
HISTOGRAM_BINS = 21  # odd: unchanged classes fall in a bin centred on 0
SLANTED_LABELS = 90  # characters of class labels that fit under an axis unslanted
BEFORE_COLOUR, AFTER_COLOUR, FORGOTTEN_COLOUR, OTHER_COLOUR = (
    "#9e9e9e",
    "#1f77b4",
    "#d62728",
    "#c7c7c7",
)
FIGURE_INCHES, DOTS_PER_INCH = (13, 8), 100


@dataclass(frozen=True)
class Picture:
    """What one picture shows, whichever command measured it."""

    title: str
    series: tuple[str, str]  # what the two accuracies are: ("before", "after") or so
    before: Accuracy | None  # None: evaluate without a reference
    after: Accuracy
    forgotten: list[int]
    destinations: dict[int, dict[int, int]]  # forgotten class -> predicted class -> samples
    probe: dict[str, float] | None  # series name -> probe accuracy on the forgotten classes
    chance: float | None  # the probe's chance level
    class_count: int  # the model's classes, else the classes in the set
    names: Sequence[str] | None

    def label(self, label: int) -> str:
        return class_label(label, self.names)


def class_label(label: int, names: Sequence[str] | None) -> str:
    """A class as a picture names it: its name and index when the run has names."""
    if names is not None and 0 <= label < len(names) and str(names[label]) != str(label):
        return f"{names[label]} ({label})"
    return str(label)


def check_matplotlib() -> None:
    """Fail before any work when the picture could not be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise InstallationError(MISSING_MATPLOTLIB)


def choose_layout(class_count: int) -> str:
    """One bar per class while they stay readable, else a summary of the forgotten
    classes and a histogram of the rest. The model's class count decides, so that one
    model's pictures look alike whichever classes a set holds."""
    return PER_CLASS if class_count <= MAX_CLASS_BARS else MANY_CLASSES


def forget_picture(report: Report, opened: OpenedModel) -> Picture:
    """A forget run's picture, on its last comparison: the held-out samples when given."""
    comparison = report.comparisons[-1]
    names = _class_names(opened)
    where = "held-out samples" if comparison.name == "eval" else "the samples used"
    probe = report.probe
    return Picture(
        title=f"Forgetting {_classes_text(report.forgotten_classes, names)}, measured on {where}",
        series=("before", "after"),
        before=comparison.before,
        after=comparison.after,
        forgotten=report.forgotten_classes,
        destinations=report.confusion or {},
        probe={name: probe[name]["forgotten"] for name in ("before", "after")} if probe else None,
        chance=probe["before"]["chance"] if probe else None,
        class_count=opened.signature.class_count or len(comparison.after.per_class),
        names=names,
    )


def evaluation_picture(evaluation: Evaluation, opened: OpenedModel) -> Picture:
    """An evaluation's picture: the reference model is "before" when there is one."""
    names = _class_names(opened)
    forgotten = evaluation.forgotten_classes
    readable = {name: r for name, r in (evaluation.probe or {}).items() if r is not None}
    return Picture(
        title="Evaluation on labelled samples; forgotten: "
        + (_classes_text(forgotten, names) if forgotten else "none"),
        series=("reference", "model"),
        before=evaluation.reference_accuracy,
        after=evaluation.accuracy,
        forgotten=forgotten,
        destinations=evaluation.confusion,
        probe={name: r.forgotten for name, r in readable.items()} or None,
        chance=next(iter(readable.values())).chance if readable else None,
        class_count=opened.signature.class_count or len(evaluation.accuracy.per_class),
        names=names,
    )


def _class_names(opened: OpenedModel) -> Sequence[str] | None:
    settings = opened.settings
    return read_class_names(settings.class_names, settings.max_sample_bytes)


def _classes_text(classes: list[int], names: Sequence[str] | None) -> str:
    word = "class" if len(classes) == 1 else "classes"
    return f"{word} " + ", ".join(class_label(c, names) for c in classes)


def write_png(picture: Picture, stream: BinaryIO) -> None:
    """Draw `picture` and write it to `stream` as PNG, with the Agg canvas (no display,
    no global matplotlib state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InstallationError(MISSING_MATPLOTLIB) from None
    figure = Figure(figsize=FIGURE_INCHES, dpi=DOTS_PER_INCH, layout="constrained")
    if choose_layout(picture.class_count) == PER_CLASS:
        rows = [["accuracy", "accuracy"], ["destinations", "probe"]]
    else:
        rows = [["accuracy", "destinations"], ["change", "probe"]]
    if picture.probe is None:  # the panel left of the probe's takes its place
        rows = [[name if name != "probe" else row[0] for name in row] for row in rows]
    panels = figure.subplot_mosaic(rows)
    if "change" in panels:
        _accuracy_bars(panels["accuracy"], picture, sorted(picture.forgotten))
        _change_histogram(panels["change"], picture)
    else:
        _accuracy_bars(panels["accuracy"], picture, sorted(picture.after.per_class))
    _destinations(panels["destinations"], picture)
    if picture.probe is not None:
        _probe(panels["probe"], picture)
    figure.suptitle(f"{picture.title}\n{_summary(picture)}", fontsize=13)
    FigureCanvasAgg(figure).print_png(stream)


def _summary(picture: Picture) -> str:
    """Accuracy on the kept and on the forgotten classes, before → after."""
    parts = []
    for name, what in (("retain", "kept classes"), ("forget", "forgotten")):
        after = getattr(picture.after, name)
        if np.isnan(after):
            continue
        before = "" if picture.before is None else f"{getattr(picture.before, name):.1f}% → "
        parts.append(f"{what} {before}{after:.1f}%")
    series = " → ".join(picture.series) if picture.before else picture.series[1]
    return f"accuracy ({series}): " + ", ".join(parts)


def _accuracy_bars(axes, picture: Picture, classes: list[int]) -> None:
    """Accuracy of each of `classes`, before and after side by side; forgotten in red."""
    shown = [c for c in classes if c in picture.after.per_class]
    if not shown:
        _empty(axes, "no samples of a forgotten class here")
        return
    width = 0.4 if picture.before is not None else 0.7
    offset = width / 2 if picture.before is not None else 0.0
    before_name, after_name = picture.series
    kept = [c for c in shown if c not in picture.forgotten]
    forgotten = [c for c in shown if c in picture.forgotten]
    groups = [
        (shown, picture.before, -offset, BEFORE_COLOUR, before_name),
        (kept, picture.after, offset, AFTER_COLOUR, after_name),
        (forgotten, picture.after, offset, FORGOTTEN_COLOUR, f"{after_name}, forgotten class"),
    ]
    for group, accuracy, shift, colour, name in groups:
        if accuracy is None or not group:
            continue
        positions = [shown.index(c) + shift for c in group]
        values = [accuracy.per_class[c] for c in group]
        bars = axes.bar(positions, values, width, color=colour, label=name)
        axes.bar_label(bars, fmt="%.0f", fontsize=7)
    labels = [picture.label(c) for c in shown]
    slanted = sum(map(len, labels)) > SLANTED_LABELS
    axes.set_xticks(
        range(len(shown)),
        labels,
        rotation=30 if slanted else 0,
        ha="right" if slanted else "center",
    )
    for tick, label in zip(axes.get_xticklabels(), shown):
        if label in picture.forgotten:
            tick.set_color(FORGOTTEN_COLOUR)
            tick.set_fontweight("bold")
    axes.set_xlim(-0.6, max(len(shown), MIN_SLOTS) - 0.4)
    axes.set_ylim(0, 119)  # room for the legend above the bars
    axes.set_ylabel("accuracy (%)")
    axes.set_xlabel("class")
    samples = sum(picture.after.counts[c] for c in shown)
    every = len(shown) == len(picture.after.per_class)
    what = "Accuracy per class" if every else "Accuracy of the forgotten classes"
    axes.set_title(f"{what} ({samples} samples)")
    axes.legend(loc="upper center", ncols=3, fontsize=8, frameon=False)


def _destinations(axes, picture: Picture) -> None:
    """For each forgotten class, the classes its samples are now predicted as: the top
    ones, then the rest together; each with its share of the class's samples."""
    rows = []  # (label, samples, share of the class's samples, colour)
    for forgotten, where in sorted(picture.destinations.items()):
        ranked = sorted(where.items(), key=lambda item: -item[1])
        total = sum(where.values())
        source = f"{picture.label(forgotten)} → " if len(picture.destinations) > 1 else ""
        for predicted, samples in ranked[:TOP_DESTINATIONS]:
            itself = predicted == forgotten
            label = source + picture.label(predicted) + (" (itself)" if itself else "")
            colour = FORGOTTEN_COLOUR if itself else AFTER_COLOUR
            rows.append((label, samples, samples / total, colour))
        rest = sum(samples for _, samples in ranked[TOP_DESTINATIONS:])
        if rest:
            others = len(ranked) - TOP_DESTINATIONS
            rows.append((f"{source}{others} other classes", rest, rest / total, OTHER_COLOUR))
    if not rows:
        _empty(axes, "no samples of a forgotten class here")
        return
    labels, samples, shares, colours = zip(*rows)
    positions = np.arange(len(rows))
    bars = axes.barh(positions, samples, 0.7, color=colours)
    axes.bar_label(bars, [f"{n} ({100 * f:.0f}%)" for n, f in zip(samples, shares)], padding=3)
    axes.set_yticks(positions, labels)
    axes.set_ylim(max(len(rows), MIN_SLOTS) - 0.4, -0.6)  # first row on top
    axes.set_xlim(0, max(samples) * 1.2)
    axes.set_xlabel(f"samples predicted as this class ({picture.series[1]})")
    total = sum(sum(where.values()) for where in picture.destinations.values())
    sources = _classes_text(sorted(picture.destinations), picture.names)
    each = " each" if len(picture.destinations) > 1 else ""
    axes.set_title(f"Where the {total} samples of {sources} go (top {TOP_DESTINATIONS}{each})")


def _probe(axes, picture: Picture) -> None:
    """How well a linear probe on the head's input labels the forgotten samples."""
    names = [name for name in picture.series if name in picture.probe]
    colours = [BEFORE_COLOUR if name == picture.series[0] else AFTER_COLOUR for name in names]
    bars = axes.bar(names, [picture.probe[name] for name in names], 0.5, color=colours)
    axes.bar_label(bars, fmt="%.1f%%", fontsize=8)
    axes.axhline(picture.chance, color="black", linestyle="--", linewidth=1, label="chance")
    axes.set_xlim(-0.6, len(picture.series) - 0.4)
    axes.set_ylim(0, 110)
    axes.set_ylabel("forgotten samples labelled correctly (%)")
    axes.set_title("Linear probe on the head's input (cross-validated)")
    axes.legend(loc="upper right", fontsize=8)


def _change_histogram(axes, picture: Picture) -> None:
    """The kept classes' accuracy change in points, or their accuracy without a "before"."""
    kept = [c for c in picture.after.per_class if c not in picture.forgotten]
    if not kept:
        _empty(axes, "no samples of a kept class here")
        return
    after = np.array([picture.after.per_class[c] for c in kept])
    if picture.before is None:
        axes.hist(after, bins=np.linspace(0, 100, HISTOGRAM_BINS + 1), color=AFTER_COLOUR)
        axes.set_xlabel(f"accuracy of the {picture.series[1]} (%)")
        axes.set_title(f"Accuracy of the {len(kept)} kept classes in the samples")
    else:
        change = after - np.array([picture.before.per_class[c] for c in kept])
        reach = max(float(np.max(np.abs(change))), 1.0)
        axes.hist(change, bins=np.linspace(-reach, reach, HISTOGRAM_BINS + 1), color=AFTER_COLOUR)
        axes.axvline(0, color="black", linewidth=1)
        axes.set_xlabel(f"accuracy change, {picture.series[1]} − {picture.series[0]} (points)")
        axes.set_title(
            f"Accuracy change of the {len(kept)} kept classes in the samples "
            f"(mean {change.mean():+.1f})"
        )
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.set_ylabel("classes")


def _empty(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes)
    axes.set_axis_off()
