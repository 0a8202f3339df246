"""Lightning's start-up chatter held back while the package runs a Trainer for the caller, then put back as it was.

Lightning logs accelerator lines and "Tip" adverts at INFO when a Trainer is built, and some versions warn
about things this package does on purpose; a library call should print none of that unless asked.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
KNOWN_WARNINGS = (
    r".*treespec, LeafSpec.*",  # torch's pytree deprecation, raised inside Lightning
    r"Checkpoint directory .* exists and is not empty",  # a resumed run reuses its checkpoints/ on purpose
    r"Your `IterableDataset` has `__len__` defined",  # folder runs' group steps come from the main process: exact
)


@contextmanager
def lightning_quiet(verbose: bool = False) -> Iterator[None]:
    """Within the block Lightning's loggers show warnings only and its known warnings are hidden; with
    ``verbose`` nothing changes. Logger levels and warning filters are restored on exit."""
    if verbose:
        yield
        return
    import lightning.pytorch  # noqa: F401  (its import sets the logger levels saved here)

    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
