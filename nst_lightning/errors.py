"""User-facing errors: the CLI prints their message on one line and exits with code 2 (128 + signal for RunInterrupted).

Messages name the Python API's arguments (``resume="last"``, ``overwrite=True``, ``output=``); ``for_cli``
turns them into the command line's flags, so each message is written once and reads right in both.
"""

import re

CLI_FLAGS: tuple[tuple[str, str], ...] = (
    (r'resume="([^"]*)"', r"--resume \1"),
    (r"resume=True", "--resume"),
    (r"overwrite=True", "--overwrite"),
    (r"resume=(?=\s|$)", "--resume"),  # "run without resume= to start it"
    (r"output=(?=\s|$)", "--output"),  # "choose another output= directory", never a value such as output=runs/x
)
"""Python argument spellings in messages (regular expressions) and the ``nst-lightning`` flags they become."""


def for_cli(message: str) -> str:
    """``message`` as the command line says it: Python arguments (``overwrite=True``) become flags (``--overwrite``)."""
    for python, flag in CLI_FLAGS:
        message = re.sub(rf"(?<![\w.\-']){python}", flag, message)
    return message


class NSTError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""


class ConfigError(NSTError):
    """The configuration is invalid (unknown key, wrong type, incompatible options)."""


class ImageError(NSTError):
    """An image file is missing, unreadable or unusable."""


class WeightsError(NSTError):
    """VGG19 weights cannot be found or do not fit the architecture."""


class CheckpointError(NSTError):
    """A checkpoint is unreadable or belongs to another run."""


class OnnxError(NSTError):
    """An ONNX graph is missing, unreadable, or does not match the configured feature extractor."""


class RunInterrupted(NSTError):
    """A stop signal (Ctrl-C, SIGTERM) ended the run after saving what it could; exit code 128 + signal.

    ``summary`` says when it stopped and what was saved, ``hint`` how to go on; ``resumable`` whether a
    checkpoint exists to resume from.
    """

    def __init__(self, summary: str, signum: int, resumable: bool) -> None:
        self.summary = summary
        self.signum = signum
        self.resumable = resumable
        self.hint = 'resume with resume="last"' if resumable else "no checkpoint was written yet; start again with overwrite=True"
        super().__init__(f"{summary}; {self.hint}")


class NumericalError(NSTError):
    """The loss or the image became NaN or infinite; the last good image and checkpoint are kept."""


class ResourceError(NSTError):
    """The run needs more memory than the machine has (found before the run, or when it ran out), or disk."""


class DependencyError(NSTError):
    """An optional dependency a feature needs is not installed; the message names the extra to install."""


class VideoError(NSTError):
    """A clip is unreadable or unusable: corrupt, no frames, a variable frame rate, mixed frame sizes, too large."""
