"""Peak memory and time per phase of `onnx-forget` against the number of samples used.

Each size runs in a fresh process so its peak resident memory is its own. Sizes are
total samples (retain + forget): 10 % forget samples, the rest spread over kept classes.

    python benchmarks/memory.py [--model M.onnx --samples DIR --forget-class 3 --sizes 100,1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FORGET_SHARE = 0.1
TOLERANCE = 0.10  # issue 2: peak at 1,000 samples within 10 % of the peak at 100


def run_once(model: str, samples: str, forget_class: int, size: int, classes: int) -> dict:
    """One forget run in this process; returns its counts, phase times and peak memory."""
    import onnx_forget

    forget = max(1, round(size * FORGET_SHARE))
    retain_per_class = max(1, (size - forget) // (classes - 1))
    with tempfile.TemporaryDirectory() as folder:
        result = onnx_forget.forget(
            model,
            forget_class,
            samples,
            output=Path(folder) / "out.onnx",
            retain_per_class=retain_per_class,
            forget_samples=forget,
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
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        figures = run_once(args.model, args.samples, args.forget_class, args.child, args.classes)
        print(json.dumps(figures))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        command = [
            sys.executable,
            __file__,
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
        ]
        finished = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(finished.stdout.strip().splitlines()[-1]))
    phases = list(rows[0]["timings_s"])
    print(f"model {args.model}")
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
