"""Forget every class of every fixture model, with the paper's method and the defaults.

    python benchmarks/quality.py [--models mnist_cnn,mnist_resnet] [--methods paper,head-repair]
                                 [--classes 0,3,8] [--depth all|auto|N] [--seed N]
                                 [--max-patches N] [--per-class]

Each run sees only the sample folder (a depth search validates on a split of it); both
models are then scored on the held-out set. For each model and method, one row: held-out
retain and forget accuracy before and after (mean over the classes), the worst retain
drop, how many classes meet the goal (forget <= 1 %, retain drop <= 1.5 points), the
kept classes' top-1 agreement with the original, the layers projected (fewest-most), the
linear probe's readability of the forgotten class before and after, the
membership-inference share of the forgotten class's training samples before and after,
and the mean time of a run. Then, for the classes that have one, the membership and probe
figures of the CNN retrained from scratch without the class (fixtures/build.py --only
cnn_without): where forgetting should land.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

import onnx_forget
from onnx_forget.options import METHODS, ForgetOptions

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SAMPLES = FIXTURES / "mnist_samples"
# model file -> held-out set; every model takes the same sample folder.
MODELS = {
    "mnist_cnn": ("mnist_cnn.onnx", "mnist_heldout.npz"),
    "mnist_resnet": ("mnist_resnet.onnx", "mnist_heldout.npz"),
    "mnist_mobilenet": ("mnist_mobilenet.onnx", "mnist_heldout.npz"),
    "mnist_vit": ("mnist_vit.onnx", "mnist_heldout.npz"),
    "mnist_mlp_sklearn": ("mnist_mlp_sklearn.onnx", "mnist_heldout_flat.npz"),
    "mnist_cnn_fp16": ("mnist_cnn_fp16.onnx", "mnist_heldout.npz"),
    "mnist_cnn_batch8": ("mnist_cnn_batch8.onnx", "mnist_heldout.npz"),
    "mnist_cnn_external": ("mnist_cnn_external/model.onnx", "mnist_heldout.npz"),
    "mnist_cnn_qdq": ("mnist_cnn_qdq.onnx", "mnist_heldout.npz"),
    "mnist_resnet_qdq": ("mnist_resnet_qdq.onnx", "mnist_heldout.npz"),
    "mnist_mobilenet_qdq": ("mnist_mobilenet_qdq.onnx", "mnist_heldout.npz"),
    "mnist_cnn_qop": ("mnist_cnn_qop.onnx", "mnist_heldout.npz"),
    "mnist_mlp_dynamic": ("mnist_mlp_dynamic.onnx", "mnist_heldout_flat.npz"),
    "mnist_vit_dynamic": ("mnist_vit_dynamic.onnx", "mnist_heldout.npz"),
    "mnist_cnn_ort_optimized": ("mnist_cnn_ort_optimized.onnx", "mnist_heldout.npz"),
    "mnist_resnet_ort_optimized": ("mnist_resnet_ort_optimized.onnx", "mnist_heldout.npz"),
}
REFERENCES = {c: FIXTURES / f"mnist_cnn_without_{c}.onnx" for c in (0, 3, 8)}
FORGET_GOAL = 1.0  # the goal: forget accuracy at most 1 % ...
RETAIN_DROP_GOAL = 1.5  # ... and retain accuracy within 1.5 points of the original


def run(model: onnx.ModelProto, held_out: Path, options: dict, forgotten: int) -> dict:
    """One forget run in memory (nothing written), then both models on the held-out set.

    The run sees only the sample folder, so a depth search validates on a split of it and
    never on the held-out figures reported here.
    """
    start = time.perf_counter()
    result = onnx_forget.forget(model, forgotten, SAMPLES, **options)
    seconds = time.perf_counter() - start
    after = onnx_forget.evaluate(
        result.model, held_out, reference=model, forget_classes=[forgotten], members=SAMPLES
    )
    before = onnx_forget.evaluate(model, held_out, forget_classes=[forgotten])
    return {
        "retain_before": before.accuracy.retain,
        "retain_after": after.accuracy.retain,
        "forget_before": before.accuracy.forget,
        "forget_after": after.accuracy.forget,
        "agreement": after.agreement,
        "probe_before": after.probe["reference"].forgotten,
        "probe_after": after.probe["model"].forgotten,
        "mia_before": after.membership["reference"],
        "mia_after": after.membership["model"],
        "depth": result.report.depth["projected"] if result.report.depth else None,
        "seconds": seconds,
    }


def retrained(forgotten: int) -> dict:
    """The membership share of class `forgotten`'s training samples and the probe's
    readability of the class for the CNN retrained without it, measured like the runs'
    (same samples, same held-out set)."""
    evaluation = onnx_forget.evaluate(
        REFERENCES[forgotten],
        FIXTURES / "mnist_heldout.npz",
        forget_classes=[forgotten],
        members=SAMPLES,
    )
    return {
        "mia_after": evaluation.membership["model"],
        "probe_after": evaluation.probe["model"].forgotten,
    }


def print_references(cnn_rows: dict[str, dict[int, dict]]) -> None:
    """The CNN's membership share and probe readability after forgetting, beside the
    retrained reference's."""
    methods = list(cnn_rows)
    if not methods:  # the CNN was not among the models run
        return
    built = [c for c in REFERENCES if REFERENCES[c].is_file()]
    built = [c for c in built if all(c in cnn_rows[m] for m in methods)]
    if not built:
        return
    columns = ["retrained without it", *methods]
    print("\nmnist_cnn, the forgotten class: membership share % / probe readability %")
    print(f"{'class':>5}" + "".join(f" {c:>21}" for c in columns))
    for forgotten in built:
        rows = [retrained(forgotten), *(cnn_rows[m][forgotten] for m in methods)]
        print(
            f"{forgotten:>5}"
            + "".join(f" {r['mia_after']:>10.1f} /{r['probe_after']:>9.1f}" for r in rows)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default="paper," + METHODS[0])
    parser.add_argument("--classes", default=",".join(map(str, range(10))))
    parser.add_argument("--depth", default=ForgetOptions().depth, help="all, auto or N")
    parser.add_argument("--seed", type=int, default=ForgetOptions().seed, help="sampling seed")
    parser.add_argument(
        "--max-patches", type=int, default=ForgetOptions().max_patches, help="per layer and class"
    )
    parser.add_argument("--per-class", action="store_true", help="print every run too")
    args = parser.parse_args()
    classes = [int(c) for c in args.classes.split(",")]
    print(
        f"--max-patches {args.max_patches}; held-out accuracy %, mean over classes "
        f"{args.classes}; goal: forget <= "
        f"{FORGET_GOAL:g}, retain drop <= {RETAIN_DROP_GOAL:g}"
    )
    header = (
        f"{'model':<27} {'method':<12} {'retain':>13} {'forget':>12} {'worst drop':>10} "
        f"{'goal met':>8} {'agree':>5} {'depth':>5} {'probe':>13} {'MIA':>13} {'time':>6}"
    )
    print(header)
    cnn_rows: dict[str, dict[int, dict]] = {}
    for name in args.models.split(","):
        model_file, held_out_file = MODELS[name]
        if not (FIXTURES / model_file).is_file():
            print(f"{name:<27} (not built: python fixtures/build.py --only {name})")
            continue
        model = onnx.load(FIXTURES / model_file)
        for method in args.methods.split(","):
            rows = []
            for forgotten in classes:
                options = {
                    "method": method,
                    "depth": args.depth,
                    "seed": args.seed,
                    "max_patches": args.max_patches,
                }
                row = run(model, FIXTURES / held_out_file, options, forgotten)
                rows.append(row)
                if name == "mnist_cnn":
                    cnn_rows.setdefault(method, {})[forgotten] = row
                if args.per_class:
                    print(
                        f"  class {forgotten}: "
                        + "  ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "depth")
                        + f"  depth {row['depth']}"
                    )
            drops = [r["retain_before"] - r["retain_after"] for r in rows]
            met = sum(
                r["forget_after"] <= FORGET_GOAL and d <= RETAIN_DROP_GOAL
                for r, d in zip(rows, drops)
            )
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "depth"}
            depths = sorted({r["depth"] for r in rows if r["depth"] is not None})
            depth = "-".join(map(str, depths[:: max(1, len(depths) - 1)])) or "all"
            print(
                f"{name:<27} {method:<12}"
                f" {mean['retain_before']:>5.1f} -> {mean['retain_after']:<5.1f}"
                f" {mean['forget_before']:>4.1f} -> {mean['forget_after']:<4.1f}"
                f" {max(drops):>10.1f} {met:>4}/{len(rows):<3}"
                f" {mean['agreement']:>5.1f} {depth:>5}"
                f" {mean['probe_before']:>5.1f} -> {mean['probe_after']:<5.1f}"
                f" {mean['mia_before']:>4.1f} -> {mean['mia_after']:<4.1f}"
                f" {mean['seconds']:>5.1f}s",
                flush=True,
            )
    print_references(cnn_rows)


if __name__ == "__main__":
    main()
