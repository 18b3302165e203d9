"""Peak memory and time per phase of `onnx-forget` against the number of samples used.

Each size runs in a fresh process so its peak resident memory is its own. Sizes are
total samples (retain + forget): 10 % forget samples, the rest spread over kept classes.
`--imagenet resnet18` (or `vit_b16`) takes a random-weight ImageNet-size model and random
`.npy` samples of 10 classes from benchmarks/speed.py's cache (built on first use; torch
is needed only then). There, `--method paper` keeps the run under 10 minutes on 2 cores:
the head repair's extra forward pass over 5,000 ImageNet-size samples takes 2 of them.

    python -m benchmarks.memory [--model M.onnx --samples DIR --forget-class 3]
                                [--sizes 100,1000] [--max-patches N] [--imagenet NAME]
                                [--method head-repair|paper]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.speed import DEFAULT_CACHE, MODELS, model_path, samples_folder
from onnx_forget.options import DEFAULT_MAX_PATCHES, METHODS

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
FORGET_SHARE = 0.1
TOLERANCE = 0.10  # the target: peak at 1,000 samples within 10 % of the peak at 100


def run_once(args, size: int) -> dict:
    """One forget run in this process; returns its counts, phase times and peak memory."""
    import onnx_forget

    forget = max(1, round(size * FORGET_SHARE))
    retain_per_class = max(1, (size - forget) // (args.classes - 1))
    with tempfile.TemporaryDirectory() as folder:
        result = onnx_forget.forget(
            args.model,
            args.forget_class,
            args.samples,
            output=Path(folder) / "out.onnx",
            retain_per_class=retain_per_class,
            forget_samples=forget,
            max_patches=args.max_patches,
            method=args.method,
        )
    report = result.report.to_dict()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "samples": report["samples"]["retain"] + report["samples"]["forget"],
        "peak_mib": peak_kib / 1024,
        "timings_s": report["timings_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(FIXTURES / "mnist_cnn.onnx"))
    parser.add_argument("--samples", default=str(FIXTURES / "mnist_samples"))
    parser.add_argument("--forget-class", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--max-patches", type=int, default=DEFAULT_MAX_PATCHES)
    parser.add_argument("--imagenet", choices=MODELS)
    parser.add_argument("--method", choices=METHODS, default=METHODS[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_once(args, args.child)))
        return
    if args.imagenet:
        cache = Path(DEFAULT_CACHE).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        largest = max(int(s) for s in args.sizes.split(","))
        per_class = math.ceil(largest * FORGET_SHARE)  # the forget class needs the most
        args.model = str(model_path(cache, args.imagenet))
        args.samples = str(samples_folder(cache, args.classes, per_class))
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        command = [
            sys.executable,
            "-m",
            "benchmarks.memory",
            "--child",
            str(size),
            "--model",
            args.model,
            "--samples",
            args.samples,
            "--forget-class",
            str(args.forget_class),
            "--classes",
            str(args.classes),
            "--max-patches",
            str(args.max_patches),
            "--method",
            args.method,
        ]
        finished = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(finished.stdout.strip().splitlines()[-1]))
    phases = list(rows[0]["timings_s"])
    print(f"model {args.model}, --max-patches {args.max_patches}, --method {args.method}")
    print(f"{'samples':>8} {'peak MiB':>9} " + " ".join(f"{p[:12]:>12}" for p in phases))
    for row in rows:
        times = " ".join(f"{row['timings_s'][p]:>11.2f}s" for p in phases)
        print(f"{row['samples']:>8} {row['peak_mib']:>9.1f} {times}")
    ratio = rows[-1]["peak_mib"] / rows[0]["peak_mib"]
    verdict = "within" if abs(ratio - 1) <= TOLERANCE else "NOT within"
    print(
        f"peak ratio {rows[-1]['samples']} / {rows[0]['samples']} samples: {ratio:.3f} "
        f"({verdict} {TOLERANCE:.0%})"
    )


if __name__ == "__main__":
    main()
