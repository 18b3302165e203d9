"""Statistics of the real pretrained fixture collected in one process and on a local Ray
with 1 and 2 workers.

    python benchmarks/ray_collect.py [--cpus 2] [--per-class 50]

Collects every training crop of fixtures/imagenet_photos (EfficientNet-Lite0, 7 classes)
with the default options: once with `onnx_forget.collect`, then with
`onnx_forget.ray.collect` on a local Ray started here with `--cpus` CPUs, for 1 and for 2
workers. Prints each wall time (Ray's start not included) and the largest relative
difference of each Ray result's Gram matrices from the single-process ones.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import ray

import onnx_forget
import onnx_forget.ray as forget_ray
from onnx_forget.options import Preprocessing

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODEL = FIXTURES / "imagenet_efficientnet_lite0.onnx"
TRAIN = FIXTURES / "imagenet_photos" / "train"
CLASS_NAMES = FIXTURES / "imagenet_classes.txt"
PREPROCESSING = Preprocessing(scale=1.0, mean=(127.0,) * 3, std=(128.0,) * 3)


def largest_difference(a, b) -> float:
    return max(np.max(np.abs(a.grams[k] - g)) / np.max(np.abs(g)) for k, g in b.grams.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    options = {"preprocessing": PREPROCESSING, "per_class": args.per_class}
    start = time.perf_counter()
    alone = onnx_forget.collect(MODEL, TRAIN, class_names=CLASS_NAMES, **options)
    rows = [("one process (onnx_forget.collect)", time.perf_counter() - start, 0.0)]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    dataset = forget_ray.folder_dataset(TRAIN, MODEL, class_names=CLASS_NAMES).materialize()
    for workers in (1, 2):
        start = time.perf_counter()
        on_ray = forget_ray.collect(dataset, MODEL, workers=workers, **options)
        seconds = time.perf_counter() - start
        rows.append((f"Ray, {workers} worker(s)", seconds, largest_difference(on_ray, alone)))
    print(
        f"{os.cpu_count()} CPUs, local Ray of {args.cpus}; {MODEL.name}, "
        f"{sum(alone.samples.values())} crops of {len(alone.samples)} classes"
    )
    print(f"{'how':<36} {'wall s':>8} {'largest relative Gram difference':>34}")
    for label, seconds, difference in rows:
        print(f"{label:<36} {seconds:>8.1f} {difference:>34.1e}")


if __name__ == "__main__":
    main()
