"""onnx-forget: make an exported ONNX classifier forget a class, without retraining."""

from .api import ForgetResult, forget, layers
from .errors import ForgetError, InputError, UnsupportedModelError, VerificationError
from .options import ForgetOptions, Preprocessing
from .version import VERSION as __version__

__all__ = [
    "ForgetError",
    "ForgetOptions",
    "ForgetResult",
    "InputError",
    "Preprocessing",
    "UnsupportedModelError",
    "VerificationError",
    "__version__",
    "forget",
    "layers",
]
