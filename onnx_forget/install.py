"""What must be checked before onnxruntime is imported: which of its builds is installed."""

from __future__ import annotations

from importlib import metadata

from .errors import InstallationError

# Distributions that each install the `onnxruntime` package: with two, the second
# overwrote the first one's files and uninstalling either breaks the other.
ONNXRUNTIME_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-training",
)


def check_onnxruntime_installation() -> None:
    """Raise InstallationError when more than one build of onnxruntime is installed."""
    found = []
    for name in ONNXRUNTIME_DISTRIBUTIONS:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    if len(found) > 1:
        builds = " and ".join(f"{name} {version}" for name, version in found)
        names = " ".join(name for name, _ in found)
        raise InstallationError(
            f"{builds} are both installed and overwrite each other's files; keep one: "
            f"pip uninstall -y {names} && pip install onnxruntime-gpu (or onnxruntime where "
            "no GPU build exists)"
        )
