"""A model opened for a run, and what a run checks before any work: classes, sample
sets, and outputs that must not be inputs."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .batch import batch_check, symbolic_batch
from .errors import InputError, UnsupportedModelError
from .graph import DEQUANTIZE, GraphIndex
from .layer_scan import Head, LayerScan, find_head, scan_layers
from .metrics import class_scores
from .modelio import LoadedModel, load_model
from .options import ForgetOptions
from .outputs import MODEL_OUTPUT, PLOT_OUTPUT, REPORT_OUTPUT, check_outputs
from .runtime import Runner, open_runner
from .samples import SampleSet, open_samples
from .selection import select_samples, split_validation
from .signature import Signature, read_signature
from .taps import add_taps

# What the public functions take as samples: a folder or `.npz` path, or `(x, y)` arrays.
Samples = str | os.PathLike | tuple[np.ndarray, np.ndarray]
PathArgument = str | os.PathLike
VALIDATION_SHARE = 0.2  # of each class's samples, held back to validate on without eval ones


@dataclass(frozen=True)
class OpenedModel:
    """A loaded model with what every entry point needs to know about it."""

    loaded: LoadedModel
    signature: Signature
    scan: LayerScan
    settings: ForgetOptions

    @classmethod
    def of(cls, model, settings: ForgetOptions, projected: bool = True) -> OpenedModel:
        """Load and inspect `model`; with `projected`, refuse it without a layer to project."""
        loaded = load_model(model, settings.max_model_bytes)
        scan = scan_layers(loaded.proto)
        if projected and not scan.layers:
            raise UnsupportedModelError(
                f"{loaded.where}: no projectable Conv, Gemm or MatMul layer "
                "(`onnx-forget layers` says why each was skipped)"
            )
        try:
            signature = read_signature(loaded.proto, settings.output_name)
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"{loaded.where}: {error}", error.options) from None
        return cls(loaded, signature, scan, settings)

    def runner(self, model: onnx.ModelProto, memory_budget: int | None = None) -> Runner:
        """A session on `model` (this one or a rewritten copy) as the options ask; for a
        fixed-batch model, on a copy with a symbolic batch when that gives its outputs.
        `memory_budget` sizes the batches to it (`Runner.memory_budget`)."""
        fixed_batch = self.signature.fixed_batch
        if fixed_batch is not None and self.fixed_batch_kept is None:
            model, fixed_batch = symbolic_batch(model, self.signature), None
        try:
            return open_runner(
                model,
                self.settings.device,
                self.settings.batch_size,
                fixed_batch,
                self.signature.input_name,
                memory_budget,
            )
        except UnsupportedModelError as error:  # name the file the user gave
            raise UnsupportedModelError(f"{self.loaded.where}: {error}", error.options) from None

    @functools.cached_property
    def fixed_batch_kept(self) -> str | None:
        """Why a fixed-batch model must run at its own batch size (None: it need not, or
        has none), checked once."""
        if self.signature.fixed_batch is None:
            return None
        return batch_check(self.loaded.proto, self.signature)

    def tapped_runner(self, also: tuple[tuple[str, np.dtype], ...] = ()) -> Runner:
        """A session on the model with every layer's input (and `also`) as outputs, its
        batches sized to `--max-memory`: the taps are what fills the memory."""
        tapped = add_taps(self.loaded.proto, self.scan.layers, self.signature.scores_name, also)
        return self.runner(tapped, self.settings.max_memory)

    def samples(self, source: Samples) -> SampleSet:
        return open_samples(
            source,
            self.signature,
            self.settings.preprocessing,
            self.settings.class_names,
            self.settings.max_sample_bytes,
        )

    def scores(self, runner: Runner, samples: SampleSet, indices: np.ndarray) -> np.ndarray:
        """The scores output `[len(indices), classes]` of `runner`'s model, in float64."""
        return class_scores(runner, samples, indices, self.signature.scores_name)

    def original_scores(self, samples: SampleSet) -> np.ndarray:
        """This model's scores of every sample of `samples`."""
        return self.scores(self.runner(self.loaded.proto), samples, np.arange(len(samples)))

    def head(self, model: onnx.ModelProto | None = None) -> Head | None:
        """The layer writing the logits of `model` (default: this one), when the class
        count is known."""
        count = self.signature.class_count
        if not count:
            return None
        model = self.loaded.proto if model is None else model
        scan = self.scan if model is self.loaded.proto else scan_layers(model)
        return find_head(model, scan, count, self.signature.scores_name)

    @property
    def scores_quantized(self) -> bool:
        """Whether the scores output is dequantized from a QuantizeLinear (a QDQ model)."""
        index = GraphIndex(self.loaded.proto.graph)
        last = index.producer_node(self.signature.scores_name)
        if last is None or last.op_type != DEQUANTIZE:
            return False
        before = index.producer_node(last.input[0])
        return before is not None and before.op_type == "QuantizeLinear"

    @property
    def inputs(self) -> dict[str, tuple[Path, ...]]:
        """The files this model was read from, for `check_outputs`."""
        if self.loaded.path is None:
            return {}
        return {
            "the model": (self.loaded.path,),
            "the model's external data": self.loaded.external_files,
        }


def forget_class_list(forget_classes: int | Iterable[int]) -> list[int]:
    """The classes to forget, sorted, without repeats; at least one."""
    values = [forget_classes] if np.isscalar(forget_classes) else forget_classes
    classes = sorted({int(c) for c in values})
    if not classes:
        raise InputError("name at least one class to forget in forget_classes", ("forget_classes",))
    return classes


def default_output(model_path: Path, forget_classes: list[int]) -> Path:
    """`<stem>.forget-<classes>.onnx` beside the input."""
    classes = "-".join(str(c) for c in forget_classes)
    return model_path.with_name(f"{model_path.stem}.forget-{classes}.onnx")


def destination(model_path: Path | None, output, classes: list[int]) -> Path | None:
    """Where to write: `output`, else beside a model given by path, else nowhere."""
    if output is None:
        return None if model_path is None else default_output(model_path, classes)
    return Path(output)


def check_run_outputs(
    opened: OpenedModel,
    written: Path | None,
    report: PathArgument | None,
    force: bool,
    sample_set: SampleSet | None,
    others: dict[str, object],
    plot: PathArgument | None = None,
) -> None:
    """Refuse a forget run's outputs that cannot be written or are one of its inputs;
    `others` names the run's other inputs (paths, or arrays that are none)."""
    inputs = {
        **opened.inputs,
        **(sample_inputs(sample_set, opened.settings) if sample_set else {}),
        **{role: given_paths(value) for role, value in others.items()},
    }
    outputs = {
        MODEL_OUTPUT: written,
        REPORT_OUTPUT: optional_path(report),
        PLOT_OUTPUT: optional_path(plot),
    }
    check_outputs(outputs, inputs, force)


def sample_inputs(sample_set: SampleSet, settings: ForgetOptions) -> dict[str, tuple[Path, ...]]:
    """The files a sample set and its class names are read from."""
    return {
        "the samples": sample_set.paths,
        "the class names": given_paths(settings.class_names),
    }


def given_paths(value) -> tuple[Path, ...]:
    """The path among an argument that may also be arrays, names or statistics."""
    return (Path(value),) if isinstance(value, (str, os.PathLike)) else ()


def optional_path(value: PathArgument | None) -> Path | None:
    return None if value is None else Path(value)


def choose_sets(
    opened: OpenedModel,
    sample_set: SampleSet,
    classes: list[int],
    among: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Check the classes against model and samples, then pick retain and forget samples
    (from the indices `among`, default all)."""
    class_count = opened.signature.class_count
    if class_count is not None:
        beyond = [c for c in classes if c >= class_count] + sorted(
            {int(label) for label in sample_set.labels if label >= class_count}
        )
        if beyond:
            raise InputError(
                f"class {beyond[0]} does not exist: the model has {class_count} classes (0.."
                f"{class_count - 1})"
            )
    among = np.arange(len(sample_set)) if among is None else among
    labels = sample_set.labels[among]
    present = set(np.unique(labels).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise InputError(f"{sample_set.origin}: no samples of class {missing[0]} to forget")
    settings = opened.settings
    retain, forget = select_samples(
        labels, classes, settings.retain_per_class, settings.forget_samples, settings.seed
    )
    if not len(retain):
        raise InputError("no samples of a class to keep: cannot forget every class")
    return among[retain], among[forget]


def validation_split(opened: OpenedModel, sample_set: SampleSet | None, eval_samples):
    """The fit indices of `sample_set` (None: all) and the validation samples with their
    indices: `eval_samples` when given, else a seeded share of each class of the samples
    (None without samples)."""
    if eval_samples is not None:
        validation = opened.samples(eval_samples)
        return None, (validation, np.arange(len(validation)))
    if sample_set is None:
        return None, None
    fit, held = split_validation(sample_set.labels, VALIDATION_SHARE, opened.settings.seed)
    return fit, (sample_set, held)
