"""Every option of a run, defined once: its default, where the default comes from, its help
text and its command-line spelling. The command line is generated from these fields."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import InputError

# docs/method.md: the paper's retain scaling (searched over 10..1000, 100 by default) and
# forget scaling (3 on CIFAR-size data, 10 on ImageNet).
DEFAULT_ALPHA_R = 100.0
DEFAULT_ALPHA_F = 3.0
# docs/method.md: "about 100 per class" retain samples.
DEFAULT_RETAIN_PER_CLASS = 100
DEFAULT_FORGET_SAMPLES = 500
# Conv patches per layer and class: the paper's 10,000 per layer and set is 2,000 for each
# of five classes. Held-out quality measured the same from 10,000 down to 500 per class on
# the MNIST CNNs and down to 1,000 on the real EfficientNet (docs/benchmarks.md, "Patch
# budget"), while 10,000 per class gave a retain set of N classes N times the paper's.
DEFAULT_MAX_PATCHES = 2_000
DEFAULT_BATCH_SIZE = 64
DEFAULT_SEED = 0
# Largest model, file and external data together, read without `max_model_bytes`. A run
# holds the weights about three times over (loaded, rewritten, serialised for onnxruntime),
# so 4 GiB already needs 12 GiB or more of memory; it still covers ViT-H-size classifiers
# (2.5 GB in float32). Past it a model is refused before it is read.
DEFAULT_MAX_MODEL_BYTES = 4 * 2**30
# Largest sample file (a .npz counted by its arrays' uncompressed size), refused before it
# is read: a .npz is loaded whole, and 2 GiB is ~3,400 ImageNet-size float32 inputs.
DEFAULT_MAX_SAMPLE_BYTES = 2 * 2**30
DEFAULT_MAX_MEMORY = 3 * 2**29  # 1.5 GiB
DEVICES = ("auto", "cpu", "cuda")
# "paper": docs/method.md's projection only. "head-repair": the paper's projection, then
# the classifier head refitted in closed form (repair.py); it needs samples, not only
# statistics.
METHODS = ("head-repair", "paper")
DEFAULT_METHOD = METHODS[0]
LAYOUTS = ("nchw", "nhwc")
ALL_LAYERS, AUTO_DEPTH = "all", "auto"  # the depth options that are no number of layers
DEFAULT_SCALE = 1.0 / 255.0
INTERPOLATIONS = ("bilinear", "bicubic")

# Where a field's command-line option appears: the groups of commands that take it.
FORGETTING = "forgetting"  # forget only
STATISTICS = "statistics"  # forget and collect
RUNNING = "running"  # forget, collect and evaluate
LOADING = "loading"  # every command that reads a model


def option(default, help: str, group: str, **cli) -> dataclasses.Field:
    """A field with its command-line form: `help`, the `group` of commands that take it,
    and click settings (`flag`, `choices`, `numbers`, `path`, `minimum`, `shown`)."""
    return field(default=default, metadata={"help": help, "group": group, **cli})


def flag(field_: dataclasses.Field) -> str:
    """The command-line spelling of an option field."""
    return field_.metadata.get("flag", "--" + field_.name.replace("_", "-"))


@dataclass(frozen=True)
class Preprocessing:
    """How image files become model inputs: `(pixel * scale - mean) / std` per channel."""

    scale: float = option(DEFAULT_SCALE, "Pixel scale.", RUNNING, shown="1/255")
    mean: tuple[float, ...] | None = option(
        None, "Per-channel mean, e.g. 0.485,0.456,0.406.", RUNNING, numbers=True
    )
    std: tuple[float, ...] | None = option(
        None, "Per-channel std, e.g. 0.229,0.224,0.225.", RUNNING, numbers=True
    )
    layout: str | None = option(  # None: read from the model's input shape
        None, "Image layout [default: the model's].", RUNNING, choices=LAYOUTS
    )
    # As torchvision and timm evaluate: shorter side to `resize`, then the centre square of
    # `crop`; what is left is stretched to the model's input size (all of it, by default).
    resize: int | None = option(
        None, "Resize images so their shorter side is N pixels first.", RUNNING, minimum=1
    )
    crop: int | None = option(None, "Then cut the centre N x N square.", RUNNING, minimum=1)
    interpolation: str = option(
        "bilinear", "How images are resampled.", RUNNING, choices=INTERPOLATIONS
    )

    def __post_init__(self):
        if self.layout is not None and self.layout not in LAYOUTS:
            raise InputError(
                f"layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}", ("layout",)
            )
        if self.std is not None and any(s == 0 for s in self.std):
            raise InputError("std values must be non-zero", ("std",))
        for name in ("resize", "crop"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1 pixel", (name,))
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"not {self.interpolation!r}",
                ("interpolation",),
            )


@dataclass(frozen=True)
class ForgetOptions:
    """Options of a run: the method's hyper-parameters, sample selection and running."""

    alpha_r: float = option(DEFAULT_ALPHA_R, "Retain-space scaling α_r.", FORGETTING)
    alpha_f: float = option(DEFAULT_ALPHA_F, "Forget-space scaling α_f.", FORGETTING)
    retain_per_class: int = option(
        DEFAULT_RETAIN_PER_CLASS, "Samples taken from each kept class.", FORGETTING
    )
    forget_samples: int = option(
        DEFAULT_FORGET_SAMPLES, "Samples taken from the forgotten classes.", FORGETTING
    )
    max_patches: int = option(
        DEFAULT_MAX_PATCHES, "Conv patches per layer and class; 0 = every patch.", STATISTICS
    )
    batch_size: int = option(DEFAULT_BATCH_SIZE, "onnxruntime batch size.", RUNNING)
    seed: int = option(DEFAULT_SEED, "Seeds every sample and patch choice.", RUNNING)
    device: str = option("auto", "Where onnxruntime runs.", RUNNING, choices=DEVICES)
    output_name: str | None = option(  # None: the first float [N, classes] output
        None, "Scores output [default: first float [N, C]].", RUNNING, flag="--output"
    )
    # The names, or a file of one name a line: maps sample folder names to class indices.
    class_names: Sequence[str] | str | os.PathLike | None = option(
        None,
        "File of class names, one a line, mapping sample folder names to indices.",
        RUNNING,
        path=True,
    )
    preprocessing: Preprocessing = Preprocessing()
    progress: bool = False  # a progress bar on stderr while collecting
    method: str = option(
        DEFAULT_METHOD,
        "head-repair: the paper's projection, then the head refitted; paper: the paper's "
        "method only (docs/method.md).",
        FORGETTING,
        choices=METHODS,
    )
    depth: str | int = option(
        AUTO_DEPTH,
        "Layers to project, counted from the head: auto, the deepest set that keeps 99% of "
        "the kept classes' top-1 on validation samples (every layer for --method paper); "
        "all; or N.",
        FORGETTING,
    )
    max_model_bytes: int = option(
        DEFAULT_MAX_MODEL_BYTES,
        "Refuse a larger model (external data included).",
        LOADING,
        minimum=1,
    )
    max_memory: int = option(
        DEFAULT_MAX_MEMORY,
        "Bytes a batch's tapped activations may take, three batches' worth; batches shrink to fit.",
        RUNNING,
        minimum=1,
    )
    max_sample_bytes: int = option(
        DEFAULT_MAX_SAMPLE_BYTES,
        "Refuse a larger sample file (.npz arrays counted uncompressed).",
        RUNNING,
        minimum=1,
    )

    def __post_init__(self):
        object.__setattr__(self, "depth", _depth(self.depth))
        for name in ("alpha_r", "alpha_f"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive", (name,))
        for name in (
            "retain_per_class",
            "forget_samples",
            "batch_size",
            "max_model_bytes",
            "max_sample_bytes",
            "max_memory",
        ):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1", (name,))
        if self.max_patches < 0:
            raise InputError("max_patches must be 0 (every patch) or positive", ("max_patches",))
        if self.method not in METHODS:
            raise InputError(
                f"method must be one of {', '.join(METHODS)}, not {self.method!r}", ("method",)
            )
        if self.device not in DEVICES:
            raise InputError(
                f"device must be one of {', '.join(DEVICES)}, not {self.device!r}", ("device",)
            )

    @classmethod
    def among(cls, values: Mapping[str, object]) -> ForgetOptions:
        """The options among a function's keyword values (its `locals()`)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def _depth(value: str | int) -> str | int:
    """`all`, `auto`, or a positive number of layers."""
    text = str(value).strip().lower()
    if text in (ALL_LAYERS, AUTO_DEPTH):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise InputError(f"depth must be all, auto or a number of layers, not {value!r}", ("depth",))


def option_fields(group: str) -> list[dataclasses.Field]:
    """The option fields of `group`, preprocessing's expanded, in definition order."""
    found = []
    for field_ in dataclasses.fields(ForgetOptions):
        inner = dataclasses.fields(Preprocessing) if field_.name == "preprocessing" else ()
        for candidate in inner or (field_,):
            if candidate.metadata.get("group") == group:
                found.append(candidate)
    return found


def all_flags() -> dict[str, str]:
    """Every option's keyword and its command-line spelling."""
    groups = (FORGETTING, STATISTICS, RUNNING, LOADING)
    return {f.name: flag(f) for group in groups for f in option_fields(group)}
