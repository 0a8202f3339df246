"""Pictures about a run: the loss curve, content | style | result side by side, a sweep's contact sheet.

matplotlib draws on its Agg canvas through ``Figure`` directly (no pyplot, no global backend), imported
when a plot is made; files are written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .history import LOSS_TERMS, read_history
from .images import save_pil

if TYPE_CHECKING:
    import torch
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100


def _figure(width_px: float, height_px: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)


def _picture(fig: Figure) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    buf.seek(0)
    with Image.open(buf) as img:
        return img.convert("RGB")


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    return save_pil(_picture(fig), path)


def _array(image: torch.Tensor) -> np.ndarray:
    t = image.detach().float().cpu().clamp(0, 1)
    return (t[0] if t.dim() == 4 else t).permute(1, 2, 0).numpy()


def _show(ax: Axes, image: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(_array(image), interpolation="lanczos")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def read_losses(path: str | os.PathLike[str]) -> dict[str, list[float]]:
    """The columns of a run's ``losses.csv`` (``step``, ``content``, ``style``, ``smoothness``, ``loss``) as lists."""
    rows = read_history(path).rows
    return {key: [float(r[key]) for r in rows] for key in ("step", *LOSS_TERMS)}


def loss_curve(losses: str | os.PathLike[str], path: str | os.PathLike[str], stage_starts: Sequence[int] = ()) -> Path:
    """Plot a run's ``losses.csv`` to ``path`` (see ``loss_curve_picture``)."""
    return save_pil(loss_curve_picture(read_losses(losses), stage_starts), path)


def loss_curve_picture(data: Mapping[str, Sequence[float]], stage_starts: Sequence[int] = ()) -> Image.Image:
    """Content, style, smoothness and total loss (``data``: lists per column, as ``read_losses`` gives) against step on
    a log scale, 640x400 px; dashed lines where stages begin.

    Terms that stay at zero (smoothness with every smoothness weight 0) are left out, as a log axis cannot show them; the
    axis spans at most four decades below the largest value.
    """
    fig = _figure(640, 400)
    ax = fig.add_subplot()
    shown = [v for key in LOSS_TERMS for v in data[key] if v > 0]
    for key in LOSS_TERMS:
        values = data[key]
        if len(values) == len(data["step"]) and any(v > 0 for v in values):
            style = {"color": "black", "linestyle": "--", "linewidth": 1.2} if key == "loss" else {"linewidth": 1.6}
            ax.plot(data["step"], values, label=key, **style)
    for step in stage_starts:
        ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    if shown:  # a term starting at ~0 (content from a content init) would squash the rest of the plot
        ax.set_ylim(bottom=max(min(shown), 1e-4 * max(shown)))
    ax.set_xlabel("step")
    ax.set_ylabel("weighted loss")
    ax.grid(True, which="both", alpha=0.3)
    if shown:
        ax.legend()
    fig.tight_layout()
    return _picture(fig)


def side_by_side(content: torch.Tensor, styles: Sequence[torch.Tensor], result: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write content | style(s) | result to ``path`` (see ``side_by_side_picture``)."""
    return save_pil(side_by_side_picture(content, styles, result), path)


def side_by_side_picture(content: torch.Tensor, styles: Sequence[torch.Tensor], result: torch.Tensor) -> Image.Image:
    """Content | style(s) | result in one row, each scaled to the result's height, titled."""
    panels = [("content", content), *[(f"style {i + 1}" if len(styles) > 1 else "style", s) for i, s in enumerate(styles)]]
    panels.append(("result", result))
    height = max(128, min(512, result.shape[-2]))
    widths = [height * p.shape[-1] / p.shape[-2] for _, p in panels]
    fig = _figure(sum(widths) + 8 * len(panels), height + 28)
    axes = fig.subplots(1, len(panels), gridspec_kw={"width_ratios": widths})
    for ax, (title, image) in zip(axes, panels):
        _show(ax, image, title)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.01, top=1 - 24 / (height + 28), wspace=0.03)
    return _picture(fig)


def contact_sheet(
    content: torch.Tensor,
    styles: Sequence[torch.Tensor],
    results: Sequence[Sequence[torch.Tensor]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | os.PathLike[str],
    cell_px: int = 160,
) -> Path:
    """A labelled grid of results (``results[row][col]``; ``col_labels`` above the first row, ``row_labels``,
    which may hold line breaks, to the left) under a header showing the content and style(s)."""
    rows, cols = len(results), len(results[0])
    aspect = results[0][0].shape[-2] / results[0][0].shape[-1]
    cell_w, cell_h = cell_px, round(cell_px * aspect)
    gap, title = 6, 20
    label = 12 + round(5.6 * max((len(line) for text in row_labels for line in text.splitlines()), default=0))
    shown = [("content", content), *[(f"style {i + 1}" if len(styles) > 1 else "style", s) for i, s in enumerate(styles)]]
    head_w = [round(cell_h * im.shape[-1] / im.shape[-2]) for _, im in shown]
    width = label + max(cols * (cell_w + gap), sum(w + gap for w in head_w)) + gap
    height = 2 * title + cell_h + 3 * gap + rows * (cell_h + gap)
    fig = _figure(width, height)

    def place(x: float, top: float, w: float, h: float) -> Axes:
        return fig.add_axes((x / width, 1 - (top + h) / height, w / width, h / height))

    x, top = label, title
    for (name, image), w in zip(shown, head_w):
        _show(place(x, top, w, cell_h), image, name)
        x += w + gap
    top += cell_h + 2 * gap + title
    for r in range(rows):
        for c in range(cols):
            _show(place(label + c * (cell_w + gap), top, cell_w, cell_h), results[r][c], col_labels[c] if r == 0 else None)
        fig.text((label - gap) / width, 1 - (top + cell_h / 2) / height, row_labels[r], ha="right", va="center", fontsize=8)
        top += cell_h + gap
    return _save(fig, path)
