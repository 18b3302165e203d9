"""The subcommands: parse the options, call the API, print the result."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import click

from . import api
from .cli import PROGRAM
from .errors import InputError
from .options import (
    FORGETTING,
    LOADING,
    RUNNING,
    STATISTICS,
    Preprocessing,
    flag,
    option_fields,
)
from .report import format_evaluation, format_layers, format_statistics, format_tuning, layer_rows
from .version import VERSION

PATH = click.Path(path_type=Path)


class _ForgetByDefault(click.Group):
    """`onnx-forget MODEL ...` is short for `onnx-forget forget MODEL ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = ["forget", *args]
        return super().parse_args(ctx, args)


def _numbers(text: str | None, kind=float) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def _class_list(ctx, param, values) -> list[int] | None:
    if not values:
        return None
    classes = []
    for value in values if isinstance(values, tuple) else (values,):
        classes.extend(_numbers(value, int) or ())
    if any(c < 0 for c in classes):
        raise click.BadParameter("class indices are 0 or more")
    return classes


def _float_list(ctx, param, value) -> tuple | None:
    return _numbers(value)


def _click_option(field_: dataclasses.Field) -> Callable:
    """The click option of an options field, from its metadata (options.option)."""
    meta = field_.metadata
    settings = {"help": meta["help"], "default": field_.default}
    settings["show_default"] = meta.get("shown", field_.default is not None)
    if "choices" in meta:
        settings["type"] = click.Choice(meta["choices"])
    elif meta.get("numbers"):
        settings["callback"] = _float_list
    elif meta.get("path"):
        settings["type"] = PATH
    elif "minimum" in meta:
        settings["type"] = click.IntRange(min=meta["minimum"])
    elif field_.default is not None:
        settings["type"] = type(field_.default)
    return click.option(flag(field_), field_.name, **settings)


def _option_groups(*groups: str) -> Callable:
    """Every option field of `groups` as click options, in definition order."""

    def apply(command):
        fields = [f for group in groups for f in option_fields(group)]
        for field_ in reversed(fields):
            command = _click_option(field_)(command)
        return command

    return apply


_plot = click.option(
    "--plot",
    type=PATH,
    help="Draw accuracy before/after, where the forgotten samples go and the probe as a PNG "
    "here (needs the [plot] extra).",
)

_reporting = [
    click.option("--report", "report_path", type=PATH, help="Write the result as JSON here."),
    click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
]


def _reported(command):
    for decorator in reversed(_reporting):
        command = decorator(command)
    return command


def _api_options(values: dict) -> dict:
    """The API keywords of the generated options: preprocessing's fields become one."""
    names = [f.name for f in dataclasses.fields(Preprocessing)]
    values["preprocessing"] = Preprocessing(**{name: values.pop(name) for name in names})
    return values


def _show(quiet: bool, text: str) -> None:
    if not quiet:
        click.echo(text)


@click.group(cls=_ForgetByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name=PROGRAM)
def cli():
    """Make an exported ONNX classifier forget one or more classes, without retraining.

    \b
    onnx-forget MODEL --forget-class 3 --samples DIR [-o OUT.onnx]
    onnx-forget MODEL --forget-class 3 --stats stats.npz
    onnx-forget collect MODEL --samples DIR -o stats.npz
    onnx-forget merge a.npz b.npz -o all.npz
    onnx-forget evaluate MODEL --samples DIR [--reference ORIGINAL.onnx]
    onnx-forget layers MODEL
    """


@cli.command("forget")
@click.argument("model", type=PATH)
@click.option(
    "--forget-class",
    "forget_classes",
    multiple=True,
    required=True,
    callback=_class_list,
    help="Class index to forget; repeat it or give 3,5 for several.",
)
@click.option("--samples", type=PATH, help="Folder with a subfolder per class, or .npz (x, y).")
@click.option("--stats", type=PATH, help="Statistics from `collect`, instead of --samples.")
@click.option("-o", "--out", type=PATH, help="Output [default: <model>.forget-<classes>.onnx].")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--eval-samples", type=PATH, help="Held-out samples to report accuracy on.")
@click.option("--tune", is_flag=True, help="Search alpha_r x alpha_f on validation samples.")
@click.option("--alpha-r-grid", callback=_float_list, help="α_r values for --tune.")
@click.option("--alpha-f-grid", callback=_float_list, help="α_f values for --tune.")
@_option_groups(FORGETTING, STATISTICS, RUNNING, LOADING)
@_reported
@_plot
def forget_command(
    model, forget_classes, samples, stats, out, force, eval_samples, tune, alpha_r_grid,
    alpha_f_grid, report_path, quiet, debug, plot, **options,
):  # fmt: skip
    """Forget classes of MODEL and write the new model."""
    options = _api_options(options)
    common = {
        "output": out,
        "force": force,
        "eval_samples": eval_samples,
        "report": report_path,
        "plot": plot,
        "progress": not quiet,
    }
    if tune:
        if samples is None:
            raise InputError("--tune needs --samples")
        grids = {
            "alpha_r_grid": alpha_r_grid or api.ALPHA_R_GRID,
            "alpha_f_grid": alpha_f_grid or api.ALPHA_F_GRID,
        }
        del options["alpha_r"], options["alpha_f"]  # the grids take their place
        tuned = api.tune(model, forget_classes, samples, **grids, **common, **options)
        text = format_tuning(tuned.grid, tuned.best) + "\n\n" + tuned.result.report.format()
        _show(quiet, text)
        return
    result = api.forget(model, forget_classes, samples, stats=stats, **common, **options)
    _show(quiet, result.report.format())


@cli.command("collect")
@click.argument("model", type=PATH)
@click.option("--samples", type=PATH, required=True, help="Samples, as for forgetting.")
@click.option("-o", "--out", type=PATH, required=True, help="Statistics file to write (.npz).")
@click.option("--force", is_flag=True, help="Replace an existing statistics file.")
@click.option("--classes", callback=_class_list, help="Only these classes, e.g. 0,1,2.")
@click.option("--per-class", type=int, help="At most this many samples per class [all].")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    help="Run on the Ray cluster at ADDRESS (alone: a local one); needs the [ray] extra.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Ray actors."
)
@_option_groups(STATISTICS, RUNNING, LOADING)
@_reported
def collect_command(
    model, samples, out, force, classes, per_class, ray_address, workers, report_path, quiet,
    debug, **options,
):  # fmt: skip
    """Run MODEL once over samples and save per-class statistics for later forgetting."""
    statistics = api.collect(
        model,
        samples,
        classes=classes,
        per_class=per_class,
        output=out,
        force=force,
        report=report_path,
        ray_address=ray_address,
        ray_workers=workers,
        **_api_options(options),
    )
    _show(quiet, format_statistics(statistics.summary(str(out))))


@cli.command("merge")
@click.argument("parts", type=PATH, nargs=-1, required=True)
@click.option("-o", "--out", type=PATH, required=True, help="Merged statistics file (.npz).")
@click.option("--force", is_flag=True, help="Replace an existing statistics file.")
@_reported
def merge_command(parts, out, force, report_path, quiet, debug):
    """Add statistics files collected on shards of the samples of one model."""
    statistics = api.merge(parts, output=out, force=force, report=report_path)
    _show(quiet, format_statistics(statistics.summary(str(out))))


@cli.command("evaluate")
@click.argument("model", type=PATH)
@click.option("--samples", type=PATH, required=True, help="Labelled (held-out) samples.")
@click.option("--reference", type=PATH, help="The original model, to compare against.")
@click.option(
    "--forget-class",
    "forget_classes",
    multiple=True,
    callback=_class_list,
    help="Forgotten classes [default: from the model's metadata].",
)
@click.option("--members", type=PATH, help="Training samples, for the membership-inference check.")
@_option_groups(RUNNING, LOADING)
@_reported
@_plot
def evaluate_command(
    model, samples, reference, forget_classes, members, report_path, quiet, debug, plot, **options
):
    """Accuracy per class, where forgotten samples go, agreement with a reference model."""
    evaluation = api.evaluate(
        model,
        samples,
        reference=reference,
        forget_classes=forget_classes,
        members=members,
        report=report_path,
        plot=plot,
        **_api_options(options),
    )
    _show(quiet, format_evaluation(evaluation))


@cli.command("layers")
@click.argument("model", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@_option_groups(LOADING)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def layers_command(model, as_json, max_model_bytes, debug):
    """List the layers of MODEL that can be projected, and those skipped with why."""
    scan = api.layers(model, max_model_bytes)
    click.echo(json.dumps(layer_rows(scan), indent=2) if as_json else format_layers(scan))
