"""The one engine: batched optimisers match torch's, batches match one-by-one runs, no host sync between logs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nst_lightning.config import EXAMPLE_CONTENT
from nst_lightning.images import load_image
from nst_lightning.module import StyleTransferModule
from nst_lightning.optim import BatchedAdam, BatchedLBFGS


def _problem(seed: int = 0):
    """Three independent smooth non-quadratic problems, one per row of the stacked parameter."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 30, 30, generator=gen)
    a = a @ a.transpose(1, 2) + 0.1 * torch.eye(30)
    b = torch.randn(3, 30, generator=gen)
    return lambda x, i: 0.5 * x @ a[i] @ x - b[i] @ x + 0.1 * x.pow(4).sum()


@pytest.mark.parametrize(
    ("ours", "theirs", "settings", "layout"),
    [
        (BatchedLBFGS, torch.optim.LBFGS, {"lr": 1.0, "history_size": 5}, {}),
        (BatchedLBFGS, torch.optim.LBFGS, {"lr": 1.0, "history_size": 5}, {"static_history": True}),  # the CUDA graph's
        (BatchedAdam, torch.optim.Adam, {"lr": 0.1}, {}),
    ],
)
def test_each_image_of_a_batch_follows_torchs_optimizer_on_it_alone(ours, theirs, settings, layout):
    f = _problem()
    x = torch.zeros(3, 30, requires_grad=True)
    batched = ours([x], **settings, **layout)

    def closure():
        x.grad = None
        loss = sum(f(x[i], i) for i in range(3))
        loss.backward()
        return loss

    for _ in range(25):  # beyond the history size: the ring buffer wraps
        batched.step(closure)
    extra = {"max_iter": 1, "line_search_fn": None, "tolerance_grad": 0.0, "tolerance_change": 0.0}
    for i in range(3):
        xi = torch.zeros(30, requires_grad=True)
        reference = theirs([xi], **settings, **(extra if theirs is torch.optim.LBFGS else {}))

        def one():
            reference.zero_grad()
            loss = f(xi, i)
            loss.backward()
            return loss

        for _ in range(25):
            reference.step(one)
        assert xi.abs().max() > 0.3  # it moved
        torch.testing.assert_close(x[i].detach(), xi.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("static", [False, True])
def test_skipping_the_first_pair_makes_the_second_step_a_plain_one_and_keeps_later_pairs(static):
    f = _problem()
    x = torch.zeros(3, 30, requires_grad=True)
    plain = torch.zeros(3, 30, requires_grad=True)
    skipping = BatchedLBFGS([x], lr=0.5, history_size=5, skip_first_pair=True, static_history=static)
    reference = BatchedLBFGS([plain], lr=0.5, history_size=5, static_history=static)

    def closure(v):
        def run():
            v.grad = None
            loss = sum(f(v[i], i) for i in range(3))
            loss.backward()
            return loss
        return run

    skipping.step(closure(x))
    reference.step(closure(plain))
    before = x.detach().clone()
    skipping.step(closure(x))  # the gradient at `before`, then the update: no pair, so -lr * gradient
    reference.step(closure(plain))
    torch.testing.assert_close(x.detach() - before, -0.5 * x.grad.detach())
    state = skipping.state[x]
    assert float(state["rho"].abs().sum()) == 0.0 and float(state["h_diag"].sub(1).abs().max()) == 0.0
    assert float(reference.state[plain]["rho"].abs().sum()) > 0  # without the skip that pair is taken
    for _ in range(10):
        skipping.step(closure(x))
    assert float(skipping.state[x]["rho"].abs().sum()) > 0  # later pairs are kept


def _trainer(steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_one_batched_evaluation_gives_each_image_its_own_loss_and_gradient(style_small, extractor):
    # one VGG pass for the batch must not mix images: each gradient equals its solo gradient up to float
    # rounding (convolution kernels are chosen per batch size, so not bit for bit)
    photo = load_image(EXAMPLE_CONTENT, 32)
    contents = torch.cat([photo, photo.flip(-1)])
    together = StyleTransferModule(contents, [[style_small], [style_small.flip(-2)]], extractor=extractor)
    together.evaluate()
    for i, style in enumerate([style_small, style_small.flip(-2)]):
        alone = StyleTransferModule(contents[i : i + 1], style, extractor=extractor)
        alone.evaluate()
        scale = float(alone.image.grad.abs().max())
        assert scale > 0
        torch.testing.assert_close(together.image.grad[i : i + 1], alone.image.grad, rtol=0, atol=1e-4 * scale)
        torch.testing.assert_close(together.loss_terms()["loss"][i], alone.loss_terms()["loss"][0], rtol=1e-4, atol=0)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize(
    ("optim", "steps"),
    [({"name": "adam"}, 3), ({"name": "lbfgs", "history_size": 5}, 3), ({"name": "lbfgs", "max_iter": 3}, 1),
     ({"name": "lbfgs", "history_size": 5, "precondition_levels": 3}, 3)],
)
def test_a_batch_of_images_is_optimised_as_each_one_alone(style_small, extractor, optim, steps):
    # Kernels partition their sums differently for batch sizes 1 and 2 (oneDNN far more than the reference
    # convolutions used here), and L-BFGS and Adam's normalised steps amplify that float noise on a few
    # pixels: compare the images as a whole. Images sharing gradients or optimiser state differ everywhere.
    photo = load_image(EXAMPLE_CONTENT, 32)
    contents = torch.cat([photo, photo.flip(-1)])
    with torch.backends.mkldnn.flags(enabled=False):
        together = StyleTransferModule(contents, style_small, extractor=extractor, optim=optim)
        _trainer(steps).fit(together)
        for i in range(2):
            alone = StyleTransferModule(contents[i : i + 1], style_small, extractor=extractor, optim=optim)
            _trainer(steps).fit(alone)
            assert (alone.result() - contents[i : i + 1]).abs().max() > 0.02  # it moved
            difference = (together.result()[i : i + 1] - alone.result()).abs()
            assert difference.mean() < 1e-3 and difference.max() < 0.05


class _SyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: what .item(), float(t) and bool(t) dispatch to (a GPU host sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "optim",
    [{"name": "lbfgs", "max_iter": 2}, {"name": "lbfgs", "max_iter": 2, "cuda_graph": True}, {"name": "adam", "average": 0.9}],
)
def test_no_value_is_read_from_the_device_between_logging_steps(content_small, style_small, extractor, optim):
    from lightning.pytorch.callbacks import Callback

    counter = _SyncCounter()
    counts: dict[int, int] = {}

    class Count(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counter.count = 0
            counter.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            counter.__exit__(None, None, None)
            counts[trainer.global_step] = counter.count

    module = StyleTransferModule(content_small, style_small, extractor=extractor, optim=optim)
    _trainer(21, log_every_n_steps=20, callbacks=[Count()]).fit(module)
    assert [counts[s] for s in range(10, 20)] == [0] * 10
    assert counts[20] > 0  # the logging step reads the NaN guard and the losses


def test_a_nan_rolls_back_to_the_last_good_image_when_read(content_small, style_small, extractor):
    from nst_lightning.errors import NumericalError

    module = StyleTransferModule(content_small, style_small, extractor=extractor)
    trainer = _trainer(10, log_every_n_steps=5)

    class Poison(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                self.good = pl_module.image.detach().clone()
                pl_module.criteria[0].content_weight = float("nan")

    poison = Poison()
    trainer.callbacks.append(poison)
    with pytest.raises(NumericalError, match="NaN or infinite"):
        trainer.fit(module)
    assert trainer.global_step == 5
    torch.testing.assert_close(module.image.detach(), poison.good)
