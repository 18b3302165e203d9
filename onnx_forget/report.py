"""What a run did, as a terminal table or as JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .evaluate import Accuracy
from .layers import Layer, LayerScan

REPORT_FORMAT = 1


@dataclass
class Comparison:
    """One labelled set scored by the original and the new model."""

    name: str  # "samples": the ones used to forget; "eval": a held-out set
    before: Accuracy
    after: Accuracy


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
    samples: dict
    comparisons: list[Comparison] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

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
            "samples": self.samples,
            "accuracy": {c.name: _comparison_dict(c) for c in self.comparisons},
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }

    def format(self) -> str:
        """The terminal summary: layers, samples, accuracy tables, time per phase."""
        lines = [
            f"model      {self.model}",
            f"output     {self.output or '(not written)'}",
            f"forgotten  {', '.join(map(str, self.forgotten_classes))}",
            f"layers     {len(self.layers)} projected, {len(self.skipped_layers)} skipped"
            + (
                f", {len(self.copied_weights)} shared weights copied" if self.copied_weights else ""
            ),
            f"samples    {self.samples['retain']} retain, {self.samples['forget']} forget"
            + (
                f", {self.samples['skipped_files']} files skipped"
                if self.samples["skipped_files"]
                else ""
            ),
            f"provider   {self.provider}"
            + (f" ({self.provider_note})" if self.provider_note else ""),
        ]
        for comparison in self.comparisons:
            lines += ["", *accuracy_table(comparison, self.forgotten_classes)]
        phases = "  ".join(f"{name} {seconds:.2f}s" for name, seconds in self.timings.items())
        lines += ["", f"time       {phases}"]
        return "\n".join(lines)


def _comparison_dict(comparison: Comparison) -> dict:
    return {
        "before": asdict(comparison.before),
        "after": asdict(comparison.after),
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
        "d": layer.d,
        "input": layer.input,
        "shared_weight": layer.shared,
    }


def format_layers(scan: LayerScan) -> str:
    """The `onnx-forget layers` table."""
    header = f"{'node':<28} {'op':<7} {'weight':<28} {'orient':<7} {'groups':>6} {'d':>6}  input"
    lines = [header]
    for layer in scan.layers:
        weight = layer.weight.tensor + (" (shared)" if layer.shared else "")
        lines.append(
            f"{layer.node:<28} {layer.op:<7} {weight:<28} {layer.orientation:<7} "
            f"{layer.groups:>6} {layer.d:>6}  {layer.input}"
        )
    for skipped in scan.skipped:
        lines.append(f"{skipped.node:<28} {skipped.op:<7} skipped: {skipped.reason}")
    lines.append(f"{len(scan.layers)} projectable, {len(scan.skipped)} skipped")
    return "\n".join(lines)
