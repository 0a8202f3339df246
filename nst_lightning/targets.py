"""The fixed targets of ``StyleTransferModule``: each image's content features and style statistics, computed once
(by the module's extractor, tile by tile, or by another feature function such as an ONNX graph) and shared through
an explicit cache between modules of the same images. A mixin of the module, which supplies ``criteria``, the
images, ``with_margin``, ``tile``, ``style_blend``, ``style_masks``, ``fingerprint`` and ``target_cache``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import torch

from .problem import digest
from .tiling import tiled_targets


class TargetHooks:
    """``prepare_targets``: the targets every evaluation compares against, computed on first use."""

    @torch.no_grad()
    def prepare_targets(self, features: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None) -> None:
        """Compute each image's content features and style Grams once, on the module's current device, in fp32.

        ``features`` computes the activations instead of the module's extractor, e.g. an exported ONNX
        graph run by onnxruntime; the optimisation itself always uses the torch extractor (it needs gradients).
        Without it, targets may come from ``target_cache``, filled by an earlier module of the same images
        and layers.
        """
        if all(c.has_targets for c in self.criteria):
            return
        cache = self.target_cache if features is None else None
        extract = features if features is not None else self.extractor
        device = self.image.device
        masks = None if self.style_masks is None else [m if m is None else m.to(device) for m in self.style_masks]
        with torch.autocast(device.type, enabled=False):
            for i, criterion in enumerate(self.criteria):
                key = self._targets_key(i) if cache is not None else ""
                if cache is not None and key in cache:
                    criterion.load_targets(cache[key])
                    continue
                framed = self.with_margin(self.content_image[i : i + 1].to(device))
                styles = [s.to(device) for s in self.style_images[i]]
                if self.tile and features is None:
                    criterion.load_targets(tiled_targets(extract, criterion, framed, styles, self.tile, self.style_blend, masks))
                else:
                    criterion.set_targets(extract(framed), [extract(s) for s in styles], self.style_blend, masks)
                if cache is not None:
                    cache[key] = criterion.targets()

    def _targets_key(self, index: int) -> str:
        """What image ``index``'s targets depend on: its images, masks, colour mode, layers, weights and device."""
        parts = {k: v for k, v in self.fingerprint.items() if k not in ("optimizer", "average", "content", "styles", "image_shape", "temporal")}
        images = [digest(self.content_image[index]), [digest(s) for s in self.style_images[index]]]
        return json.dumps([parts, images, str(self.image.device)], sort_keys=True)
