"""The command line: parse, call the API, print. Exit codes are documented in the README."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import api
from .errors import ForgetError
from .modelio import write_text_atomically
from .options import (
    DEFAULT_ALPHA_F,
    DEFAULT_ALPHA_R,
    DEFAULT_BATCH_SIZE,
    DEFAULT_FORGET_SAMPLES,
    DEFAULT_MAX_PATCHES,
    DEFAULT_RETAIN_PER_CLASS,
    DEVICES,
    LAYOUTS,
    Preprocessing,
)
from .report import format_layers, layer_rows
from .version import VERSION

PROGRAM = "onnx-forget"
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 1


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


def _classes(ctx, param, values) -> list[int]:
    classes = []
    for value in values:
        classes.extend(_numbers(value, int) or ())
    if any(c < 0 for c in classes):
        raise click.BadParameter("class indices are 0 or more")
    return classes


@click.group(cls=_ForgetByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name=PROGRAM)
def cli():
    """Make an exported ONNX classifier forget one or more classes, without retraining.

    \b
    onnx-forget MODEL --forget-class 3 --samples DIR [-o OUT.onnx]
    onnx-forget layers MODEL
    """


@cli.command("forget")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--forget-class",
    "forget_classes",
    multiple=True,
    required=True,
    callback=_classes,
    help="Class index to forget; repeat it or give 3,5 for several.",
)
@click.option(
    "--samples",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder with one subfolder per class, or a .npz with x and y.",
)
@click.option(
    "-o",
    "--out",
    "out",
    type=click.Path(path_type=Path),
    help="Output file [default: <model>.forget-<classes>.onnx beside the model].",
)
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option(
    "--eval-samples",
    type=click.Path(path_type=Path),
    help="Held-out samples (same formats) to report accuracy on.",
)
@click.option(
    "--output", "output_name", help="Name of the scores output [default: first float [N, classes]]."
)
@click.option(
    "--class-names",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File of class names, one a line, mapping sample folder names to indices.",
)
@click.option("--scale", type=float, default=1 / 255, show_default="1/255", help="Pixel scale.")
@click.option("--mean", help="Per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406.")
@click.option("--std", help="Per-channel std divided by after the mean, e.g. 0.229,0.224,0.225.")
@click.option(
    "--layout", type=click.Choice(LAYOUTS), help="Image layout [default: from the model]."
)
@click.option("--retain-per-class", type=int, default=DEFAULT_RETAIN_PER_CLASS, show_default=True)
@click.option("--forget-samples", type=int, default=DEFAULT_FORGET_SAMPLES, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--alpha-r",
    type=float,
    default=DEFAULT_ALPHA_R,
    show_default=True,
    help="Retain-space scaling (ALGORITHM.md).",
)
@click.option(
    "--alpha-f",
    type=float,
    default=DEFAULT_ALPHA_F,
    show_default=True,
    help="Forget-space scaling (ALGORITHM.md).",
)
@click.option(
    "--max-patches",
    type=int,
    default=DEFAULT_MAX_PATCHES,
    show_default=True,
    help="Conv patches per layer and set; 0 = every patch.",
)
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report as JSON here.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def forget_command(
    model,
    forget_classes,
    samples,
    out,
    force,
    eval_samples,
    output_name,
    class_names,
    scale,
    mean,
    std,
    layout,
    report_path,
    quiet,
    debug,
    **method,
):
    """Forget classes of MODEL and write the new model."""
    if report_path is not None and not report_path.parent.is_dir():
        raise click.BadParameter(
            f"{report_path.parent}: folder does not exist", param_hint="--report"
        )
    names = None
    if class_names is not None:
        names = tuple(line.strip() for line in class_names.read_text().splitlines() if line.strip())
    result = api.forget(
        model,
        forget_classes,
        samples,
        output=out,
        force=force,
        eval_samples=eval_samples,
        output_name=output_name,
        class_names=names,
        preprocessing=Preprocessing(scale, _numbers(mean), _numbers(std), layout),
        progress=not quiet,
        **method,
    )
    if report_path is not None:
        write_text_atomically(report_path, json.dumps(result.report.to_dict(), indent=2) + "\n")
    if not quiet:
        click.echo(result.report.format())


@cli.command("layers")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def layers_command(model, as_json, debug):
    """List the layers of MODEL that can be projected, and those skipped with why."""
    scan = api.layers(model)
    if as_json:
        click.echo(json.dumps(layer_rows(scan), indent=2))
    else:
        click.echo(format_layers(scan))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; errors become one line on stderr and a documented exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        cli.main(argv, prog_name=PROGRAM, standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        click.echo(f"{PROGRAM}: error: {error.format_message()} (see --help)", err=True)
        sys.exit(error.exit_code)
    except ForgetError as error:
        if debug:
            raise
        click.echo(f"{PROGRAM}: error: {error}", err=True)
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, click.Abort):
        click.echo(f"{PROGRAM}: interrupted; nothing was written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:
        if debug:
            raise
        click.echo(
            f"{PROGRAM}: internal error: {type(error).__name__}: {error} "
            "(rerun with --debug and report it)",
            err=True,
        )
        sys.exit(EXIT_INTERNAL)
