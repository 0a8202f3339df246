"""Optical flow between frames, warping by it, and where the warp can be trusted (Ruder et al. 2016).

Flows are ``(1, 2, H, W)`` float32 tensors in pixels, ``(dx, dy)``: ``flow(a, b)`` maps each pixel ``x``
of ``a`` to ``x + flow(x)`` in ``b``, so ``warp(b, flow)`` looks like ``a``. Plain torch plus OpenCV
(the ``[video]`` extra); nothing here knows of Lightning or the config.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DependencyError

FLOW_METHODS = ("dis", "farneback")
VIDEO_EXTRA = "pip install 'nst-lightning[video]'"


def require_opencv() -> Any:
    """OpenCV, or a one-line error naming the extra that installs it."""
    try:
        import cv2
    except ImportError:
        raise DependencyError(
            f"optical flow for clips needs OpenCV (opencv-python-headless), which is not installed; {VIDEO_EXTRA}"
        ) from None
    return cv2


def _grey(image: torch.Tensor) -> np.ndarray:
    """A ``(1, 3, H, W)`` ``[0, 1]`` image as the 8-bit grey array OpenCV's flow methods take."""
    rgb = image.detach().float().cpu()[0].clamp(0, 1)
    grey = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return np.ascontiguousarray((grey * 255.0).round().to(torch.uint8).numpy())


def optical_flow(source: torch.Tensor, target: torch.Tensor, method: str = "dis") -> torch.Tensor:
    """Dense flow from ``source`` to ``target`` (same-size ``(1, 3, H, W)`` images) with OpenCV's DIS or Farneback."""
    cv2 = require_opencv()
    a, b = _grey(source), _grey(target)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        dis.setFinestScale(0)
        flow = dis.calc(a, b, None)
    elif method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 4, 15, 5, 5, 1.2, 0)
    else:
        raise ValueError(f"unknown flow method {method!r}; use one of {', '.join(FLOW_METHODS)}")
    return torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)


def _sampling_grid(flow: torch.Tensor) -> torch.Tensor:
    """``x + flow(x)`` in grid_sample's ``[-1, 1]`` coordinates (corners at pixel centres)."""
    _, _, h, w = flow.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=flow.dtype, device=flow.device),
        torch.arange(w, dtype=flow.dtype, device=flow.device),
        indexing="ij",
    )
    x = (xs + flow[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0
    y = (ys + flow[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
    return torch.stack([x, y], dim=-1)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``image`` sampled at ``x + flow(x)`` (bilinear; outside the frame the nearest border pixel)."""
    grid = _sampling_grid(flow.to(image.device, torch.float32))
    return F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)


def inside_frame(flow: torch.Tensor) -> torch.Tensor:
    """``(1, 1, H, W)`` mask of the pixels whose ``x + flow(x)`` lands inside the frame."""
    grid = _sampling_grid(flow)
    return ((grid.abs() <= 1.0).all(dim=-1)).unsqueeze(1)


def _squared_norm(flow: torch.Tensor) -> torch.Tensor:
    return flow.pow(2).sum(dim=1, keepdim=True)


def _gradient_squared(flow: torch.Tensor) -> torch.Tensor:
    """``|grad u|^2 + |grad v|^2`` by forward differences (zero past the last row and column)."""
    dx = F.pad(flow[..., :, 1:] - flow[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(flow[..., 1:, :] - flow[..., :-1, :], (0, 0, 0, 1))
    return (dx.pow(2) + dy.pow(2)).sum(dim=1, keepdim=True)


def consistency_weights(flow: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
    """Ruder et al.'s per-pixel weights ``c``: 1 where the warp by ``flow`` can be trusted, 0 elsewhere.

    ``reverse`` is the flow the other way. A pixel is disoccluded where going there and back does not
    return (``|w + w^|^2 > 0.01 (|w|^2 + |w^|^2) + 0.5``), lies on a motion boundary
    (``|grad w|^2 > 0.01 |w|^2 + 0.002``), or is carried out of the frame.
    """
    back = warp(reverse, flow)
    round_trip = _squared_norm(flow + back) > 0.01 * (_squared_norm(flow) + _squared_norm(back)) + 0.5
    boundary = _gradient_squared(flow) > 0.01 * _squared_norm(flow) + 0.002
    return (~round_trip & ~boundary & inside_frame(flow)).float()


def flow_and_weights(frame: torch.Tensor, previous: torch.Tensor, method: str = "dis") -> tuple[torch.Tensor, torch.Tensor]:
    """The flow from ``frame`` to ``previous`` and the weights of the pixels it carries reliably."""
    flow = optical_flow(frame, previous, method)
    return flow, consistency_weights(flow, optical_flow(previous, frame, method))


def warping_error(current: torch.Tensor, previous: torch.Tensor, flow: torch.Tensor, weights: torch.Tensor) -> float:
    """Mean ``|current - warp(previous)|`` (``[0, 1]`` units, over channels) on the pixels ``weights`` keep."""
    diff = (current.float() - warp(previous, flow)).abs().mean(dim=1, keepdim=True)
    kept = weights.sum()
    if float(kept) == 0.0:
        return 0.0
    return float((diff * weights).sum() / kept)
