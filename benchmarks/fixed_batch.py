"""A model exported with a fixed batch of 1 against the same network with a dynamic batch.

    python benchmarks/fixed_batch.py [--repeats 3] [--samples-per-class 100]

Three exports of the fixture CNN run the same forget job end to end (default options,
in memory): the dynamic-batch model; the batch-1 model, which a run makes symbolic after
checking it; and the batch-1 model whose Flatten is a Reshape to `[1, -1]`, which only runs
at batch 1 (the fallback). Medians over the repeats, and each one's ratio to the dynamic
model, measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

import onnx_forget

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixed_batch_one(baked_into_reshape: bool) -> onnx.ModelProto:
    """The CNN with input and output batch 1; optionally its Flatten made a Reshape to
    `[1, -1]`, as some exporters write it."""
    model = onnx.load(FIXTURES / "mnist_cnn.onnx")
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    if baked_into_reshape:
        node = next(n for n in model.graph.node if n.op_type == "Flatten")
        shape = onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape")
        model.graph.initializer.append(shape)
        node.op_type, node.input[:] = "Reshape", [node.input[0], "flat_shape"]
        del node.attribute[:]
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples-per-class", type=int, default=100)
    args = parser.parse_args()
    models = {
        "dynamic batch": onnx.load(FIXTURES / "mnist_cnn.onnx"),
        "batch 1": fixed_batch_one(False),
        "batch 1 in a Reshape": fixed_batch_one(True),
    }
    per_class = {"retain_per_class": args.samples_per_class}
    seconds, notes = {name: [] for name in models}, {}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            result = onnx_forget.forget(model, 3, FIXTURES / "mnist_samples", **per_class)
            seconds[name].append(time.perf_counter() - start)
            notes[name] = next((n for n in result.report.notes if "fixed batch" in n), "")
    base = statistics.median(seconds["dynamic batch"])
    print(f"{'model':<22} {'median s':>9} {'x dynamic':>9}  how it ran")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<22} {median:>9.2f} {median / base:>9.2f}  {notes[name][:90]}")


if __name__ == "__main__":
    main()
