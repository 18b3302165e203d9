"""How deep to project on the real pretrained fixture: every layer, the depth search, or
every layer with a depth-aware edit schedule (smaller edits early, as in DAMP).

    python benchmarks/depth.py [--classes 285,967,665] [--schedules 1,2] [--max-patches N]
                               [--ways all,auto,held-out,schedules]

For each covered class forgotten in turn, and each way of choosing, the held-out crops'
figures (fixtures/imagenet_photos/heldout): forget accuracy, the top-1 agreement with the
original of the other covered classes' crops and of crops whose original top-1 is a class
the samples leave out, the linear probe's readability of the forgotten class, the layers
projected and the seconds taken. The search runs twice: validated on a split of the
training crops (what a user without held-out crops gets) and on the held-out crops
themselves (what `--eval-samples` gives).

A schedule of power p scales the edit of the k-th of L statistics (input to head) by
((k + 1) / L) ** p: `W (I - s (I - P))` instead of `W P`, then the head is refitted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

import onnx_forget
from onnx_forget.forgetting import head_to_refit
from onnx_forget.gram import statistic_layers
from onnx_forget.opened import OpenedModel, choose_sets
from onnx_forget.options import ForgetOptions, Preprocessing
from onnx_forget.passes import pass_over_samples
from onnx_forget.repair import repair_head
from onnx_forget.rewrite import rewrite_model
from onnx_forget.timing import PhaseTimer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODEL = FIXTURES / "imagenet_efficientnet_lite0.onnx"
TRAIN = FIXTURES / "imagenet_photos" / "train"
HELD_OUT = FIXTURES / "imagenet_photos" / "heldout"
WAYS = ("all", "auto", "held-out", "schedules")  # what --ways chooses from
SETTINGS = {
    "class_names": FIXTURES / "imagenet_classes.txt",
    "preprocessing": Preprocessing(scale=1.0, mean=(127.0,) * 3, std=(128.0,) * 3),
}


def held_out_figures(model, forgotten: int) -> dict:
    """Forget accuracy, agreement (all kept crops, and those whose original top-1 is a
    class no training crop has) and the probe, on the held-out crops."""
    evaluation = onnx_forget.evaluate(
        model, HELD_OUT, reference=MODEL, forget_classes=[forgotten], **SETTINGS
    )
    original = onnx_forget.evaluate(MODEL, HELD_OUT, forget_classes=[forgotten], **SETTINGS)
    opened = OpenedModel.of(MODEL, ForgetOptions(**SETTINGS))
    held_out = opened.samples(HELD_OUT)
    before = np.argmax(opened.original_scores(held_out), axis=1)
    after = np.argmax(opened.scores(opened.runner(model), held_out, np.arange(len(held_out))), 1)
    covered = np.unique(opened.samples(TRAIN).labels)
    uncovered = ~np.isin(before, covered) & (held_out.labels != forgotten)
    return {
        "forget": evaluation.accuracy.forget,
        "agreement": evaluation.agreement,
        "uncovered": f"{100 * np.mean(after[uncovered] == before[uncovered]):.1f}% "
        f"of {uncovered.sum()}",
        "probe_before": original.probe["model"].forgotten,
        "probe_after": evaluation.probe["model"].forgotten,
    }


def forgotten_by(forgotten: int, **options) -> dict:
    """One `forget` run in memory (nothing written), its held-out figures, depth and time."""
    start = time.perf_counter()
    result = onnx_forget.forget(onnx.load(MODEL), forgotten, TRAIN, **options, **SETTINGS)
    seconds = time.perf_counter() - start
    depth = result.report.depth["projected"]
    return {**held_out_figures(result.model, forgotten), "depth": depth, "seconds": seconds}


def scheduled(forgotten: int, power: float, max_patches: int) -> dict:
    """Every layer projected with the edit scaled by depth, then the head refitted."""
    start = time.perf_counter()
    opened = OpenedModel.of(MODEL, ForgetOptions(max_patches=max_patches, **SETTINGS))
    samples = opened.samples(TRAIN)
    retain, forget = choose_sets(opened, samples, [forgotten], None)
    measured = pass_over_samples(
        opened, samples, retain, forget, head_to_refit(opened), PhaseTimer()
    )
    order = [layer.statistic_key for layer in statistic_layers(opened.scan.layers)]

    def projection_of(key):
        share = ((order.index(key) + 1) / len(order)) ** power
        project = measured.spaces[key].projection(100.0, 3.0)
        return lambda columns: columns - share * (columns - project(columns))

    rewritten = rewrite_model(opened.loaded.proto, opened.scan.layers, projection_of, {})
    model, _ = repair_head(opened, rewritten.model, measured.fit, [forgotten])
    seconds = time.perf_counter() - start
    return {**held_out_figures(model, forgotten), "depth": len(order), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="285,967,665")
    parser.add_argument("--schedules", default="1,2", help="powers p of the edit schedule")
    parser.add_argument(
        "--max-patches", type=int, default=ForgetOptions().max_patches, help="per layer and class"
    )
    parser.add_argument(
        "--ways", default=",".join(WAYS), help=f"some of {', '.join(WAYS)}, comma-separated"
    )
    args = parser.parse_args()
    chosen = args.ways.split(",")
    unknown = sorted(set(chosen) - set(WAYS))
    if unknown:
        parser.error(f"--ways: no way named {', '.join(unknown)} (known: {', '.join(WAYS)})")
    patches = args.max_patches
    candidates = {
        "all layers": ("all", lambda c: forgotten_by(c, depth="all", max_patches=patches)),
        "auto, validated on a split": (
            "auto",
            lambda c: forgotten_by(c, depth="auto", max_patches=patches),
        ),
        "auto, validated on held-out": (
            "held-out",
            lambda c: forgotten_by(c, depth="auto", eval_samples=HELD_OUT, max_patches=patches),
        ),
        **{
            f"all, schedule p={p}": ("schedules", lambda c, p=float(p): scheduled(c, p, patches))
            for p in args.schedules.split(",")
            if p
        },
    }
    ways = {name: way for name, (key, way) in candidates.items() if key in chosen}
    print(
        f"{MODEL.name}, --max-patches {patches}, held-out crops (%); agreement: the other "
        "covered classes' crops"
    )
    print(
        f"{'class':>5} {'way':<28} {'forget':>6} {'agree':>6} {'uncovered agree':>16} "
        f"{'probe':>13} {'depth':>5} {'time':>6}"
    )
    for forgotten in (int(c) for c in args.classes.split(",")):
        for name, way in ways.items():
            row = way(forgotten)
            print(
                f"{forgotten:>5} {name:<28} {row['forget']:>6.1f} {row['agreement']:>6.1f} "
                f"{row['uncovered']:>16} {row['probe_before']:>5.1f} -> {row['probe_after']:<5.1f}"
                f" {row['depth']:>5} {row['seconds']:>5.1f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
