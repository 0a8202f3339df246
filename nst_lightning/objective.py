"""The objective the optimiser minimises: each image's loss times a scale fixed at its starting point, so every
loss kind takes steps of the same size. A mixin of ``StyleTransferModule`` (which supplies ``image``, the
``objective_scale`` buffer, ``tile`` and the loss evaluations).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class ScaledObjective:
    """``objective`` and the ``objective_scale`` it multiplies by: measured at the first evaluation, or fixed."""

    def objective(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What the optimiser minimises: each image's total loss times its ``objective_scale``, summed.

        The scale, fixed at the first evaluation, makes each image's gradient at its starting point one pixel
        unit per element on average, whatever the loss kind (the paper's and Keras' losses reach 1e13 per
        pixel, the relative ones 1e-6). L-BFGS takes a plain gradient step of that size whenever it has no
        curvature pair and skips pairs with y.s < 1e-10: unscaled, a 1e13 gradient threw every pixel to 0 or
        255 under bf16 (whose input resolution swallowed the tiny first step), and the relative losses stood
        still at 256 px and above. Directions are otherwise invariant to the factor. The sum keeps the images
        independent: each one's gradient is its own loss's.
        """
        if not self._scale_ready:
            self._set_objective_scale(terms["loss"])
        return (terms["loss"] * self.objective_scale).sum()

    def _set_objective_scale(self, losses: torch.Tensor) -> None:
        """``objective_scale = 1 / mean |d loss_i / d image_i|`` per image at the current images, without a host
        sync (the element count where that mean is 0 or not finite)."""
        (grad,) = torch.autograd.grad(losses.sum(), self.image, retain_graph=True)
        self._scale_from_gradient(grad)

    def _scale_from_gradient(self, grad: torch.Tensor) -> None:
        """``objective_scale`` from each image's loss gradient with respect to the parameter."""
        mean = grad.float().abs().flatten(1).mean(1)
        usable = torch.isfinite(mean) & (mean > 0)
        fallback = torch.full_like(mean, float(self.image[0].numel()))
        with torch.no_grad():
            self.objective_scale.copy_(torch.where(usable, 1.0 / torch.where(usable, mean, 1.0), fallback))
        self._scale_ready = True

    def starting_objective_scale(self) -> torch.Tensor:
        """The objective scale at the current images (one evaluation), as the first step would fix it."""
        with torch.enable_grad():
            if self.tile:
                self.prepare_targets()
                self._scale_from_gradient(self.tiled_terms(self.image.detach() / self.pixel_scale)[1] / self.pixel_scale)
            else:
                self._set_objective_scale(self.loss_terms()["loss"])
        return self.objective_scale.detach().clone()

    def use_objective_scale(self, scale: torch.Tensor) -> None:
        """Fix the objective scale instead of measuring it at the start: a warm start (a clip's frame begun from
        the previous result) sits near a minimum, and a scale measured there would make its steps far too big."""
        with torch.no_grad():
            self.objective_scale.copy_(scale.to(self.objective_scale.device).expand_as(self.objective_scale))
        self._scale_ready = True
