"""The errors onnx-forget raises, each tied to one documented exit code."""


class ForgetError(Exception):
    """Base of every error the tool reports to the user as one line.

    `options` are the keywords of the options the message names, as a Python caller
    spells them; the command line shows its own flags in their place.
    """

    exit_code = 1

    def __init__(self, message: str, options: tuple[str, ...] = ()):
        super().__init__(message)
        self.options = options

    def __str__(self) -> str:
        """The message on one line: the checker and onnxruntime write theirs on several."""
        return " ".join(super().__str__().split())


class InputError(ForgetError):
    """Bad usage or unreadable input: a path, an option, a sample file."""

    exit_code = 2


class UnsupportedModelError(ForgetError):
    """The model is valid input but outside what onnx-forget can rewrite or run."""

    exit_code = 3


class VerificationError(ForgetError):
    """The rewritten model failed the checker, did not load, or changed its signature."""

    exit_code = 4


class InstallationError(ForgetError):
    """The Python environment cannot run onnx-forget as installed (exit 3, as a model
    onnxruntime cannot run)."""

    exit_code = 3
