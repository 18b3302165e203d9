"""The paper's method on each quantized fixture beside its float original, per class.

    python benchmarks/formats.py [--classes 0,3,8] [--method paper] [--seeds 0,1]

For each (float, QDQ) pair of fixture models, each class and each seed of the sample
choice, forget the class in both and print held-out retain and forget accuracy side by
side, with their differences: with the same samples and options, what differs is
quantization noise (the goal: within 1.5 points). With several seeds, each pair and class
also gets the mean over the seeds, which tells quantization apart from what one seed's
choice of samples and patches does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

import onnx_forget

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SAMPLES = FIXTURES / "mnist_samples"
HELD_OUT = FIXTURES / "mnist_heldout.npz"
PAIRS = {
    "mnist_cnn": "mnist_cnn_qdq",
    "mnist_resnet": "mnist_resnet_qdq",
    "mnist_mobilenet": "mnist_mobilenet_qdq",
}
GOAL = 1.5  # points between the float and the quantized model's figures


def held_out(model: Path, forgotten: int, method: str, seed: int) -> tuple[float, float]:
    """Held-out retain and forget accuracy after forgetting, of a model forgotten in
    memory (nothing written)."""
    result = onnx_forget.forget(
        onnx.load(model), forgotten, SAMPLES, eval_samples=HELD_OUT, method=method, seed=seed
    )
    after = result.report.comparisons[1].after
    return after.retain, after.forget


def row(label: str, figures: np.ndarray) -> tuple[str, bool]:
    """A printed line for `figures` [[float retain, forget], [QDQ retain, forget]], and
    whether both differences are within the goal."""
    difference = figures[1] - figures[0]
    text = f"{label} " + " ".join(
        f"{figures[0, k]:>7.1f} / {figures[1, k]:>6.1f} {difference[k]:>+6.1f}" for k in (0, 1)
    )
    return text, bool(np.all(np.abs(difference) <= GOAL))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="0,3,8")
    parser.add_argument("--method", default="paper")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    classes = [int(c) for c in args.classes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"held-out accuracy % after forgetting, --method {args.method}; goal: |diff| <= {GOAL}")
    print(
        f"{'float model':<16} {'class':>5} {'seed':>4} {'retain':>16} {'diff':>6} "
        f"{'forget':>16} {'diff':>6}"
    )
    met = {seed: 0 for seed in seeds}
    met_on_mean = total = 0
    for float_name, quantized_name in PAIRS.items():
        for forgotten in classes:
            runs = []
            for seed in seeds:
                figures = np.array(
                    [
                        held_out(FIXTURES / f"{name}.onnx", forgotten, args.method, seed)
                        for name in (float_name, quantized_name)
                    ]
                )
                text, within = row(f"{float_name:<16} {forgotten:>5} {seed:>4}", figures)
                print(text, flush=True)
                met[seed] += within
                runs.append(figures)
            if len(seeds) > 1:
                text, within = row(f"{float_name:<16} {forgotten:>5} {'mean':>4}", np.mean(runs, 0))
                print(text, flush=True)
                met_on_mean += within
            total += 1
    for seed in seeds:
        print(f"seed {seed}: within {GOAL} points on both: {met[seed]}/{total} (float / int8 QDQ)")
    if len(seeds) > 1:
        print(f"mean over seeds {args.seeds}: within {GOAL} points on both: {met_on_mean}/{total}")


if __name__ == "__main__":
    main()
