"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


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
