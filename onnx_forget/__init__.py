"""onnx-forget: make an exported ONNX classifier forget a class, without retraining.

The public names load on first use: importing the package imports no onnxruntime, so
the command line can check the installation before onnxruntime is first imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    ForgetError,
    InputError,
    InstallationError,
    UnsupportedModelError,
    VerificationError,
)
from .install import check_onnxruntime_installation
from .version import VERSION as __version__

if TYPE_CHECKING:  # what editors and type checkers see
    from .api import (
        Evaluation,
        ForgetResult,
        TuneResult,
        collect,
        evaluate,
        forget,
        layers,
        merge,
        tune,
    )
    from .gram_file import ClassStatistics, load_statistics
    from .options import ForgetOptions, Preprocessing

# Public name -> the module defining it.
_LAZY = {
    **dict.fromkeys(
        ("Evaluation", "ForgetResult", "TuneResult", "collect", "evaluate", "forget"), "api"
    ),
    **dict.fromkeys(("layers", "merge", "tune"), "api"),
    **dict.fromkeys(("ForgetOptions", "Preprocessing"), "options"),
    **dict.fromkeys(("ClassStatistics", "load_statistics"), "gram_file"),
}

__all__ = [
    "ClassStatistics",
    "Evaluation",
    "ForgetError",
    "ForgetOptions",
    "ForgetResult",
    "InputError",
    "InstallationError",
    "Preprocessing",
    "TuneResult",
    "UnsupportedModelError",
    "VerificationError",
    "__version__",
    "collect",
    "evaluate",
    "forget",
    "layers",
    "load_statistics",
    "merge",
    "tune",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    check_onnxruntime_installation()
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
