"""What only a CUDA device can show; skipped where there is none (CI), run on a GPU machine as it is."""

from __future__ import annotations

import pytest
import torch

from nst_lightning.color import matched_colors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_colour_matching_runs_on_the_images_device():
    style, content = torch.rand(1, 3, 16, 20), torch.rand(1, 3, 16, 16)
    on_gpu = matched_colors(style.cuda(), content.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), matched_colors(style, content), atol=1e-5, rtol=0)
