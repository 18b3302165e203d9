"""The command line's entry point: errors become one line and a documented exit code."""

from __future__ import annotations

import re
import sys
import traceback
import warnings

import click

from .errors import ForgetError
from .install import check_onnxruntime_installation
from .options import all_flags

PROGRAM = "onnx-forget"
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 1
# The API's keywords that are no option field, as the command line spells them; the
# options' own spellings come from their fields (options.flag).
ARGUMENT_FLAGS = {
    "samples": "--samples",
    "stats": "--stats",
    "output": "--out",
    "force": "--force",
    "eval_samples": "--eval-samples",
    "report": "--report",
    "forget_classes": "--forget-class",
    "classes": "--classes",
    "per_class": "--per-class",
    "reference": "--reference",
    "members": "--members",
    "plot": "--plot",
    "ray_address": "--ray",
    "ray_workers": "--workers",
}


def message(error: ForgetError) -> str:
    """The error's line with the options it names spelled as flags."""
    flags = {**all_flags(), **ARGUMENT_FLAGS}
    text = str(error)
    for keyword in error.options:
        text = re.sub(rf"\b{re.escape(keyword)}\b", flags.get(keyword, keyword), text)
    return text


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; errors become one line on stderr and a documented exit code.

    The installation is checked before the subcommands import onnxruntime.
    """
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:  # a library's warnings on stderr would break the one-line contract
        warnings.simplefilter("ignore")
    try:
        check_onnxruntime_installation()
        from .commands import cli
        from .runtime import quiet_onnxruntime

        quiet_onnxruntime()
        cli.main(argv, prog_name=PROGRAM, standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        click.echo(f"{PROGRAM}: error: {error.format_message()} (see --help)", err=True)
        sys.exit(error.exit_code)
    except ForgetError as error:
        if debug:  # the traceback, then the same line and exit code a pipeline relies on
            traceback.print_exc()
        click.echo(f"{PROGRAM}: error: {message(error)}", err=True)
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, click.Abort):
        click.echo(f"{PROGRAM}: interrupted; nothing was written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:  # any other error is a bug: say so in one line
        if debug:
            raise
        click.echo(
            f"{PROGRAM}: internal error: {type(error).__name__}: {error} "
            "(rerun with --debug and report it)",
            err=True,
        )
        sys.exit(EXIT_INTERNAL)
