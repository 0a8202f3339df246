"""``python -m nst_lightning.lightning_cli``: Lightning's own CLI over ``StyleTransferModule``.

For people who drive runs with LightningCLI YAML (``fit``, ``--trainer.*``, ``--ckpt_path last``,
``--print_config``) rather than the ``nst-lightning`` command. The model section is the module's
constructor (images as paths, settings as typed sections); a folder run adds
``--data nst_lightning.data.StylePairsDataModule``. Needs the ``cli`` extra (``jsonargparse[signatures]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.util import find_spec
from typing import Any

from .errors import NSTError

EXTRA_HINT = "pip install 'nst-lightning[cli]'"


def main(args: Sequence[str] | None = None) -> Any:
    """Run LightningCLI over ``StyleTransferModule`` (any LightningDataModule as ``--data``) and return it; a
    one-line error (exit code 2) when the ``cli`` extra is missing and for the package's own errors."""
    from .cli import EXIT_USAGE, echo_error

    if find_spec("jsonargparse") is None or find_spec("docstring_parser") is None:
        echo_error(f"LightningCLI needs jsonargparse[signatures], which is not installed; {EXTRA_HINT}")
        raise SystemExit(EXIT_USAGE)
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # notices for Lightning's code, not for its users
    from lightning.pytorch.cli import LightningCLI

    from .module import StyleTransferModule

    try:
        return LightningCLI(
            StyleTransferModule,
            None,
            auto_configure_optimizers=False,  # the module brings its own (batched L-BFGS or Adam)
            save_config_kwargs={"overwrite": True},  # a continued run rewrites the config it ran with
            args=None if args is None else list(args),
        )
    except NSTError as err:
        echo_error(str(err))
        raise SystemExit(EXIT_USAGE) from None

if __name__ == "__main__":
    main()
