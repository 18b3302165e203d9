"""Every option of a forget run, with its default and where the default comes from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import InputError

# ALGORITHM.md: the paper's retain scaling (searched over 10..1000, 100 by default) and
# forget scaling (3 on CIFAR-size data, 10 on ImageNet).
DEFAULT_ALPHA_R = 100.0
DEFAULT_ALPHA_F = 3.0
# ALGORITHM.md: "about 100 per class" retain samples; conv patches capped at 10,000.
DEFAULT_RETAIN_PER_CLASS = 100
DEFAULT_FORGET_SAMPLES = 500
DEFAULT_MAX_PATCHES = 10_000
DEFAULT_BATCH_SIZE = 64
# Largest model, file and external data together, read without --max-model-bytes. A run
# holds the weights about three times over (loaded, rewritten, serialised for onnxruntime),
# so 4 GiB already needs 12 GiB or more of memory; it still covers ViT-H-size classifiers
# (2.5 GB in float32). Past it a model is refused before it is read.
DEFAULT_MAX_MODEL_BYTES = 4 * 2**30
# Largest sample file (a .npz counted by its arrays' uncompressed size), refused before it
# is read: a .npz is loaded whole, and 2 GiB is ~3,400 ImageNet-size float32 inputs.
DEFAULT_MAX_SAMPLE_BYTES = 2 * 2**30
DEVICES = ("auto", "cpu", "cuda")
# "paper": ALGORITHM.md exactly. "head-repair": the paper's projection, then the
# classifier head refitted in closed form (repair.py); it needs samples, not only --stats.
METHODS = ("head-repair", "paper")
LAYOUTS = ("nchw", "nhwc")


@dataclass(frozen=True)
class Preprocessing:
    """How image files become model inputs: `(pixel * scale - mean) / std` per channel."""

    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None  # None: read from the model's input shape

    def __post_init__(self):
        if self.layout is not None and self.layout not in LAYOUTS:
            raise InputError(f"--layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        if self.std is not None and any(s == 0 for s in self.std):
            raise InputError("--std values must be non-zero")


@dataclass(frozen=True)
class ForgetOptions:
    """Options of `forget`: the method's hyper-parameters, sample selection and running."""

    alpha_r: float = DEFAULT_ALPHA_R
    alpha_f: float = DEFAULT_ALPHA_F
    retain_per_class: int = DEFAULT_RETAIN_PER_CLASS
    forget_samples: int = DEFAULT_FORGET_SAMPLES
    max_patches: int = DEFAULT_MAX_PATCHES
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    device: str = "auto"
    output_name: str | None = None  # the scores output; None: the first float [N, classes]
    class_names: tuple[str, ...] | None = None
    preprocessing: Preprocessing = Preprocessing()
    progress: bool = False
    method: str = METHODS[0]
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES

    def __post_init__(self):
        for name in ("alpha_r", "alpha_f"):
            if not getattr(self, name) > 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive")
        for name in (
            "retain_per_class",
            "forget_samples",
            "batch_size",
            "max_model_bytes",
            "max_sample_bytes",
        ):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_patches < 0:
            raise InputError("--max-patches must be 0 (every patch) or positive")
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.device not in DEVICES:
            raise InputError(f"--device must be one of {', '.join(DEVICES)}, not {self.device!r}")

    @classmethod
    def from_keywords(cls, **keywords) -> ForgetOptions:
        """Build options from keyword arguments, naming any unknown one."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(unknown)}")
        return cls(**keywords)
