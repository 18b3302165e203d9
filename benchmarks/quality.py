"""Forget every class of a model in turn and print held-out accuracy before and after.

    python benchmarks/quality.py [--model M.onnx --samples DIR --eval-samples F.npz]
                                 [--option alpha_f=10 ...]

Prints one row per class (retain and forget accuracy on the held-out set, before and
after, and the run time) and the mean over classes.
"""

from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path

import numpy as np
import onnx

import onnx_forget

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(FIXTURES / "mnist_cnn.onnx"))
    parser.add_argument("--samples", default=str(FIXTURES / "mnist_samples"))
    parser.add_argument("--eval-samples", default=str(FIXTURES / "mnist_heldout.npz"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument(
        "--option", action="append", default=[], help="forget() keyword as NAME=VALUE"
    )
    args = parser.parse_args()
    options = {}
    for item in args.option:
        name, value = item.split("=", 1)
        options[name] = ast.literal_eval(value)
    model = onnx.load(args.model)
    print(f"model {args.model}  options {options or 'defaults'}")
    print(
        f"{'class':>5} {'retain before':>14} {'retain after':>13} "
        f"{'forget before':>14} {'forget after':>13} {'time':>7}"
    )
    rows = []
    for forgotten in range(args.classes):
        start = time.perf_counter()
        result = onnx_forget.forget(
            model, forgotten, args.samples, eval_samples=args.eval_samples, **options
        )
        seconds = time.perf_counter() - start
        held_out = result.report.comparisons[1]
        row = (
            held_out.before.retain,
            held_out.after.retain,
            held_out.before.forget,
            held_out.after.forget,
            seconds,
        )
        rows.append(row)
        print(
            f"{forgotten:>5} {row[0]:>14.1f} {row[1]:>13.1f} {row[2]:>14.1f} "
            f"{row[3]:>13.1f} {row[4]:>6.1f}s"
        )
    mean = np.mean(rows, axis=0)
    print(
        f"{'mean':>5} {mean[0]:>14.1f} {mean[1]:>13.1f} {mean[2]:>14.1f} "
        f"{mean[3]:>13.1f} {mean[4]:>6.1f}s"
    )


if __name__ == "__main__":
    main()
