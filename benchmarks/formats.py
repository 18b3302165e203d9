"""The paper's method on each quantized fixture beside its float original, per class.

    python benchmarks/formats.py [--classes 0,3,8] [--method paper]

For each (float, QDQ) pair of fixture models and each class, forget the class in both and
print held-out retain and forget accuracy side by side, with their differences: with the
same samples and options, what differs is quantization noise (the goal: within 1.5 points).
"""

from __future__ import annotations

import argparse
from pathlib import Path

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


def held_out(model: Path, forgotten: int, method: str):
    """Held-out accuracy after forgetting, of a model forgotten in memory (nothing written)."""
    result = onnx_forget.forget(
        onnx.load(model), forgotten, SAMPLES, eval_samples=HELD_OUT, method=method, device="cpu"
    )
    return result.report.comparisons[1].after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="0,3,8")
    parser.add_argument("--method", default="paper")
    args = parser.parse_args()
    classes = [int(c) for c in args.classes.split(",")]
    print(f"held-out accuracy % after forgetting, --method {args.method}; goal: |diff| <= {GOAL}")
    print(f"{'float model':<16} {'class':>5} {'retain':>16} {'diff':>6} {'forget':>16} {'diff':>6}")
    met = total = 0
    for float_name, quantized_name in PAIRS.items():
        for forgotten in classes:
            plain = held_out(FIXTURES / f"{float_name}.onnx", forgotten, args.method)
            quantized = held_out(FIXTURES / f"{quantized_name}.onnx", forgotten, args.method)
            retain_diff = quantized.retain - plain.retain
            forget_diff = quantized.forget - plain.forget
            met += abs(retain_diff) <= GOAL and abs(forget_diff) <= GOAL
            total += 1
            print(
                f"{float_name:<16} {forgotten:>5} {plain.retain:>7.1f} / {quantized.retain:>6.1f}"
                f" {retain_diff:>+6.1f} {plain.forget:>7.1f} / {quantized.forget:>6.1f}"
                f" {forget_diff:>+6.1f}"
            )
    print(f"within {GOAL} points on both: {met}/{total} (float / int8 QDQ)")


if __name__ == "__main__":
    main()
