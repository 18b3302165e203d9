"""What a run did, as a terminal table or as JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .layer_scan import Layer, LayerScan
from .metrics import Accuracy

REPORT_FORMAT = 1


@dataclass
class Comparison:
    """One labelled set scored by the original and the new model."""

    name: str  # "samples": the ones used to forget; "eval": a held-out set
    before: Accuracy
    after: Accuracy
    agreement: float  # percent of kept-class samples that keep their original top-1
    # the same for kept samples whose original top-1 is a class the samples leave out
    uncovered: dict | None = None  # samples, agreement


@dataclass
class Report:
    """Everything a pipeline needs to know about a run; `to_dict` is the JSON schema."""

    model: str
    output: str | None
    forgotten_classes: list[int]
    options: dict
    provider: str
    provider_note: str | None
    layers: list[dict]
    skipped_layers: list[dict]
    copied_weights: list[str]
    rescaled_channels: int  # quantized weight channels whose scale grew to hold them
    samples: dict
    comparisons: list[Comparison] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    confusion: dict[int, dict[int, int]] | None = None  # forgotten class -> predicted counts
    membership: dict[str, float] | None = None  # attack's member share, before and after
    probe: dict | None = None  # the forgotten classes' probe readability, before and after
    notes: list[str] = field(default_factory=list)  # what the run could not do, and why
    tuning: list[dict] | None = None  # the α grid of a search: one dict per point
    depth: dict | None = None  # layers projected of all, each depth tried, why it stopped

    def to_dict(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            "model": self.model,
            "output": self.output,
            "forgotten_classes": self.forgotten_classes,
            "options": self.options,
            "provider": self.provider,
            "provider_note": self.provider_note,
            "layers": self.layers,
            "skipped_layers": self.skipped_layers,
            "copied_weights": self.copied_weights,
            "rescaled_channels": self.rescaled_channels,
            "samples": self.samples,
            "accuracy": {c.name: _comparison_dict(c) for c in self.comparisons},
            "confusion": self.confusion,
            "membership": self.membership,
            "probe": self.probe,
            "notes": self.notes,
            "depth": self.depth,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            **({"tuning": {"grid": self.tuning}} if self.tuning is not None else {}),
        }

    def format(self) -> str:
        """The terminal summary: layers, samples, accuracy tables, time per phase."""
        lines = [
            f"model      {self.model}",
            f"output     {self.output or '(not written)'}",
            f"forgotten  {', '.join(map(str, self.forgotten_classes))}",
            f"method     {self.options['method']}, alpha_r {self.options['alpha_r']:g}, "
            f"alpha_f {self.options['alpha_f']:g}",
            f"layers     {len(self.layers)} projected, {len(self.skipped_layers)} skipped"
            + (f", {len(self.copied_weights)} shared weights copied" if self.copied_weights else "")
            + (
                f", {self.rescaled_channels} quantized channels rescaled"
                if self.rescaled_channels
                else ""
            ),
            f"samples    {self.samples['retain']} retain, {self.samples['forget']} forget"
            + (
                f", {self.samples['skipped_files']} files skipped"
                if self.samples["skipped_files"]
                else ""
            )
            + _batch_text(self.samples.get("batch")),
            f"provider   {self.provider}"
            + (f" ({self.provider_note})" if self.provider_note else ""),
            *([f"depth      {_depth_line(self.depth)}"] if _partial(self.depth) else []),
            *(f"note       {note}" for note in self.notes),
        ]
        for comparison in self.comparisons:
            lines += ["", *accuracy_table(comparison, self.forgotten_classes)]
        for label, where in (self.confusion or {}).items():
            spread = ", ".join(f"{p}: {n}" for p, n in sorted(where.items(), key=lambda i: -i[1]))
            lines.append(f"class {label} samples now go to  {spread}")
        if self.probe:
            lines.append(_probe_line(self.probe))
        if self.membership:
            lines.append(
                "membership inference: forgotten samples called members "
                f"{self.membership['before']:.1f}% before, {self.membership['after']:.1f}% after"
            )
        phases = "  ".join(f"{name} {seconds:.2f}s" for name, seconds in self.timings.items())
        lines += ["", f"time       {phases}"]
        return "\n".join(lines)


def _batch_text(batch: dict | None) -> str:
    """The batch size, when something other than --batch-size chose it."""
    if not batch or batch["why"] == "--batch-size":
        return ""
    return f"; batches of {batch['size']} ({batch['why']})"


def _probe_line(probe: dict) -> str:
    """How well a linear probe on the head's input still tells the forgotten classes."""
    before, after = probe["before"], probe["after"]
    where = "held-out samples" if probe["set"] == "eval" else "the samples used"
    return (
        f"linear probe on the head's input labels forgotten samples correctly "
        f"{before['forgotten']:.1f}% before, {after['forgotten']:.1f}% after "
        f"(chance {before['chance']:.1f}%; cross-validated on {where})"
    )


def _partial(depth: dict | None) -> bool:
    """Whether the depth is worth a line: searched, or fewer layers than all projected."""
    return bool(depth) and (bool(depth["trials"]) or depth["projected"] < depth["of"])


def _depth_line(depth: dict) -> str:
    """How many layers were projected, and for a searched depth what each depth kept."""
    line = f"{depth['projected']} of {depth['of']} layers projected ({depth['stopped']})"
    tried = ", ".join(f"{t['depth']}: {t['agreement']:.1f}%" for t in depth["trials"])
    return line + (f"; kept-class agreement by depth {tried}" if tried else "")


def _comparison_dict(comparison: Comparison) -> dict:
    return {
        "before": asdict(comparison.before),
        "after": asdict(comparison.after),
        "agreement": comparison.agreement,
        "uncovered": comparison.uncovered,
    }


def accuracy_table(comparison: Comparison, forgotten: list[int]) -> list[str]:
    """Rows of per-class accuracy before/after, then the retain and forget summaries."""
    title = "accuracy on the samples used" if comparison.name == "samples" else "held-out accuracy"
    rows = [f"{title} (%)", f"{'class':>8} {'n':>6} {'before':>8} {'after':>8}"]
    for label, count in comparison.before.counts.items():
        mark = " forgotten" if label in forgotten else ""
        rows.append(
            f"{label:>8} {count:>6} {comparison.before.per_class[label]:>8.1f} "
            f"{comparison.after.per_class[label]:>8.1f}{mark}"
        )
    rows.append(
        f"{'retain':>8} {'':>6} {_pct(comparison.before.retain)} {_pct(comparison.after.retain)}"
    )
    rows.append(
        f"{'forget':>8} {'':>6} {_pct(comparison.before.forget)} {_pct(comparison.after.forget)}"
    )
    if not math.isnan(comparison.agreement):
        rows.append(f"kept samples that keep their original top-1: {comparison.agreement:.1f}%")
    if comparison.uncovered:
        rows.append(
            f"  of them {comparison.uncovered['samples']} with an uncovered class as top-1: "
            f"{comparison.uncovered['agreement']:.1f}%"
        )
    return rows


def _pct(value: float) -> str:
    return f"{'-':>8}" if math.isnan(value) else f"{value:>8.1f}"


def layer_rows(scan: LayerScan) -> list[dict]:
    """One dict per layer found, projected or skipped, for `onnx-forget layers`."""
    rows = [_layer_dict(layer) for layer in scan.layers]
    rows += [
        {"node": s.node, "op": s.op, "status": "skipped", "reason": s.reason} for s in scan.skipped
    ]
    return rows


def _layer_dict(layer: Layer) -> dict:
    return {
        "node": layer.node,
        "op": layer.op,
        "status": "projected",
        "weight": layer.weight.tensor,
        "orientation": layer.orientation,
        "weight_shape": list(layer.weight_shape),
        "groups": layer.groups,
        "d": layer.input_size,
        "input": layer.input,
        "shared_weight": layer.shared,
    }


def format_layers(scan: LayerScan) -> str:
    """The `onnx-forget layers` table."""
    header = f"{'node':<28} {'op':<13} {'weight':<28} {'orient':<7} {'groups':>6} {'d':>6}  input"
    lines = [header]
    for layer in scan.layers:
        weight = layer.weight.tensor + (" (shared)" if layer.shared else "")
        lines.append(
            f"{layer.node:<28} {layer.op:<13} {weight:<28} {layer.orientation:<7} "
            f"{layer.groups:>6} {layer.input_size:>6}  {layer.input}"
        )
    for skipped in scan.skipped:
        lines.append(f"{skipped.node:<28} {skipped.op:<13} skipped: {skipped.reason}")
    lines.append(f"{len(scan.layers)} projectable, {len(scan.skipped)} skipped")
    return "\n".join(lines)


def format_tuning(grid: list[dict], best: dict) -> str:
    """The α grid as a table, best point marked, and how close the runners-up came."""
    lines = ["alpha search (validation %; score = retain * (100 - forget))"]
    lines.append(f"{'alpha_r':>8} {'alpha_f':>8} {'retain':>8} {'forget':>8} {'score':>9}")
    for point in grid:
        mark = "  <- best" if point is best else ""
        lines.append(
            f"{point['alpha_r']:>8g} {point['alpha_f']:>8g} {point['retain']:>8.1f} "
            f"{point['forget']:>8.1f} {point['score']:>9.1f}{mark}"
        )
    runners_up = sorted((p for p in grid if p is not best), key=lambda p: -p["score"])[:2]
    for point in runners_up:
        lines.append(
            f"runner-up alpha_r={point['alpha_r']:g} alpha_f={point['alpha_f']:g}: "
            f"score {point['score']:.1f} ({point['score'] - best['score']:+.1f})"
        )
    return "\n".join(lines)


def format_statistics(summary: dict) -> str:
    """What a statistics file holds."""
    classes = ", ".join(f"{c}: {n}" for c, n in summary["samples"].items())
    return "\n".join(
        [
            f"statistics  {summary['path']}",
            f"model       sha256 {summary['model_sha256']}",
            f"layers      {summary['statistics']} statistics",
            f"samples     {classes}",
            f"options     {summary['options']}",
        ]
    )


def format_evaluation(evaluation) -> str:
    """The `onnx-forget evaluate` table."""
    accuracy = evaluation.accuracy
    lines = [f"{'class':>8} {'n':>6} {'accuracy':>9}"]
    for label, count in accuracy.counts.items():
        mark = " forgotten" if label in evaluation.forgotten_classes else ""
        lines.append(f"{label:>8} {count:>6} {accuracy.per_class[label]:>9.1f}{mark}")
    lines.append(f"{'retain':>8} {'':>6} {_pct(accuracy.retain)}")
    lines.append(f"{'forget':>8} {'':>6} {_pct(accuracy.forget)}")
    for label, where in evaluation.confusion.items():
        spread = ", ".join(f"{p}: {n}" for p, n in sorted(where.items(), key=lambda i: -i[1]))
        lines.append(f"class {label} samples go to  {spread}")
    if evaluation.agreement is not None:
        lines.append(
            f"top-1 agreement with the reference on kept classes  {evaluation.agreement:.1f}%"
        )
        lines.append(f"mean KL(reference || model) on kept classes  {evaluation.kl_divergence:.4f}")
    for name, share in (evaluation.membership or {}).items():
        lines.append(
            f"membership inference ({name}): forgotten samples called members {share:.1f}%"
        )
    for name, readable in (evaluation.probe or {}).items():
        if readable is not None:
            lines.append(
                f"linear probe on the head's input ({name}): forgotten samples labelled "
                f"correctly {readable.forgotten:.1f}% (chance {readable.chance:.1f}%)"
            )
    return "\n".join(lines)
