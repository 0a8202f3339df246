"""``python -m nst_lightning`` runs the CLI."""

from .cli import run

run()
