"""The pipeline figures of the fixture CNN: forgetting from a statistics file against
forgetting from samples, and two classes in one run against two rounds.

    python benchmarks/pipelines.py [--repeats 3]

Times are medians of `--repeats` runs in this process; nothing is written but temporary
files.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnx_forget

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODEL = FIXTURES / "mnist_cnn.onnx"
SAMPLES = FIXTURES / "mnist_samples"
HELD_OUT = FIXTURES / "mnist_heldout.npz"


def median_seconds(task, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        task()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        stats = Path(folder) / "stats.npz"
        collect = median_seconds(lambda: onnx_forget.collect(MODEL, SAMPLES).save(stats), 1)
        from_samples = median_seconds(
            lambda: onnx_forget.forget(MODEL, 3, SAMPLES, output=Path(folder) / "a.onnx",
                                       force=True, method="paper"),
            args.repeats,
        )  # fmt: skip
        from_stats = median_seconds(
            lambda: onnx_forget.forget(MODEL, 3, stats=stats, output=Path(folder) / "b.onnx",
                                       force=True),
            args.repeats,
        )  # fmt: skip
        print(f"collect once (10 classes x 100 samples): {collect:.2f}s")
        print(f"forget class 3 from samples (paper):      {from_samples:.2f}s (median)")
        print(f"forget class 3 from the statistics file:  {from_stats:.2f}s (median)")
        print(f"from samples / from statistics: {from_samples / from_stats:.2f}x")

        out = Path(folder)
        onnx_forget.forget(MODEL, [3, 5], SAMPLES, output=out / "no35.onnx")
        onnx_forget.forget(MODEL, 3, SAMPLES, output=out / "no3.onnx")
        onnx_forget.forget(out / "no3.onnx", 5, SAMPLES, output=out / "no3-then-5.onnx")
        print("\nforgetting 3 and 5 (defaults), held-out accuracy %:")
        print(f"{'':<16} {'retain':>7} {'forget':>7}")
        rows = (("original", MODEL), ("one run {3,5}", out / "no35.onnx"),
                ("3, then 5", out / "no3-then-5.onnx"))  # fmt: skip
        for name, path in rows:
            accuracy = onnx_forget.evaluate(path, HELD_OUT, forget_classes=[3, 5]).accuracy
            print(f"{name:<16} {accuracy.retain:>7.1f} {accuracy.forget:>7.1f}")


if __name__ == "__main__":
    main()
