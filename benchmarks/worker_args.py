"""The command line both benchmark workers share, so the two systems get identical run settings."""

from __future__ import annotations

import argparse


def worker_parser() -> argparse.ArgumentParser:
    """Arguments of run_ours.py and run_pastiche.py: images, size, evaluations, output, snapshots."""
    p = argparse.ArgumentParser()
    p.add_argument("--content", required=True)
    p.add_argument("--style", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--evals", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--snapshot-every", type=int, default=0)
    return p
