"""onnx-forget: make an exported ONNX classifier forget a class, without retraining."""

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
from .errors import ForgetError, InputError, UnsupportedModelError, VerificationError
from .options import ForgetOptions, Preprocessing
from .statsfile import ClassStatistics, load_statistics
from .version import VERSION as __version__

__all__ = [
    "ClassStatistics",
    "Evaluation",
    "ForgetError",
    "ForgetOptions",
    "ForgetResult",
    "InputError",
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
