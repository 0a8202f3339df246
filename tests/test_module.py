"""The LightningModule and the fit API: one parameter, falling loss, frozen VGG, exact resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from nst_lightning.api import fit, load_images
from nst_lightning.errors import CheckpointError, ConfigError
from nst_lightning.image_logging import ImageLogger
from nst_lightning.images import read_image, resize
from nst_lightning.module import StyleTransferModule


def test_the_image_is_the_only_trainable_parameter(content_small, style_small, extractor):
    module = StyleTransferModule(content_small, style_small, extractor=extractor)
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["image"]
    assert module.image.shape == content_small.shape
    assert module.batch_size == 1


@pytest.mark.parametrize("init", ["content", "noise", "style"])
def test_initial_image(content_small, style_small, extractor, init):
    a = StyleTransferModule(content_small, style_small, extractor=extractor, init=init, seed=3).result()
    b = StyleTransferModule(content_small, style_small, extractor=extractor, init=init, seed=3).result()
    torch.testing.assert_close(a, b)
    if init == "content":
        torch.testing.assert_close(a, content_small, atol=1e-6, rtol=0)
    elif init == "noise":
        c = StyleTransferModule(content_small, style_small, extractor=extractor, init=init, seed=4).result()
        assert not torch.equal(a, c)
        assert 0.45 < float(a.mean()) < 0.55 and float(a.std()) > 0.25  # uniform noise over the pixel range
    else:
        # the style image, resized to the content's shape (not the content, not noise)
        torch.testing.assert_close(a, resize(style_small, tuple(content_small.shape[-2:])), atol=1e-5, rtol=0)
        assert (a - content_small).abs().mean() > 0.05


def test_too_small_image_for_the_layers_is_refused(extractor, style_small):
    with pytest.raises(ConfigError, match="need at least 16 px per side"):
        StyleTransferModule(torch.rand(1, 3, 8, 40), style_small, extractor=extractor)


def _run(module, steps, **kw):
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kw,
    )
    trainer.fit(module)
    return trainer


# torch's strong-Wolfe search gets max_iter * 5/4 evaluations per step: with 3 it cannot shrink an overlong
# first try from noise and repeats the same failed search every step, so it gets 6
@pytest.mark.parametrize("optim", [{"name": "lbfgs"}, {"name": "adam"}, {"name": "lbfgs", "line_search": "strong_wolfe", "max_iter": 6}])
def test_loss_falls_and_vgg_is_unchanged(content_small, style_small, extractor, optim):
    module = StyleTransferModule(content_small, style_small, extractor=extractor, optim=optim, init="noise")
    before = {k: v.clone() for k, v in extractor.state_dict().items()}
    start = module()["loss"].item()
    _run(module, 8)
    end = module()["loss"].item()
    assert end < 0.8 * start
    for k, v in extractor.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert module.image.min() >= 0 and module.image.max() <= module.pixel_scale


def test_bf16_mixed_runs_a_bf16_copy_of_the_vgg_and_keeps_the_image_and_the_shared_extractor_fp32(
    content_small, style_small, extractor
):
    from nst_lightning.export import weights_digest

    digest = weights_digest(extractor)
    module = StyleTransferModule(content_small, style_small, extractor=extractor)
    start = module()["loss"].item()
    _run(module, 5, precision="bf16-mixed")
    assert module.network.dtype == torch.bfloat16
    assert extractor.dtype == torch.float32 and weights_digest(extractor) == digest  # cast in place before: digest changed
    assert module.image.dtype == torch.float32 and module.criteria[0].gram0_relu1_1.dtype == torch.float32
    assert module()["loss"].item() < start


def test_fit_writes_the_run_directory(tiny_config):
    cfg = tiny_config(steps=6)
    out = fit(cfg, progress=False)
    assert out.final.is_file() and read_image(out.final).shape[-2:] == (48, 48)
    assert out.config.is_file() and out.last_checkpoint.is_file()
    assert sorted(p.name for p in out.snapshots.iterdir()) == ["step_000003.png", "step_000006.png"]
    rows = out.losses.read_text().splitlines()
    assert rows[0] == "step,content,style,smoothness,loss" and len(rows) == 8
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(7))  # step 0: the starting image
    losses = [float(r.split(",")[-1]) for r in rows[1:]]
    assert losses[-1] < losses[0]
    module = StyleTransferModule(*load_images(cfg))
    assert abs(losses[0] - module()["loss"].item()) <= 1e-3 * losses[0]


def test_resume_continues_the_same_optimisation(tiny_config, tmp_path):
    whole = fit(tiny_config(steps=8, output=tmp_path / "whole"), progress=False)
    first = fit(tiny_config(steps=4, output=tmp_path / "split"), progress=False)
    second = fit(tiny_config(steps=8, output=tmp_path / "split"), resume="last", progress=False)
    assert second.root == first.root
    a, b = read_image(whole.final), read_image(second.final)
    assert (a - b).abs().max() <= 2 / 255
    rows = second.losses.read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(0, 9))
    torch.testing.assert_close(
        torch.load(whole.last_checkpoint, weights_only=True)["state_dict"]["image"],
        torch.load(second.last_checkpoint, weights_only=True)["state_dict"]["image"],
        atol=1e-3, rtol=1e-4,
    )


def test_checkpoints_hold_the_image_not_the_vgg(tiny_config):
    out = fit(tiny_config(steps=2), progress=False)
    ckpt = torch.load(out.last_checkpoint, weights_only=True)
    assert list(ckpt["state_dict"]) == ["image", "objective_scale"]
    assert ckpt["nst_lightning"]["image_shape"] == [1, 3, 48, 48]


def test_a_checkpoint_from_another_run_is_refused(tiny_config, tmp_path):
    other = fit(tiny_config(steps=2, output=tmp_path / "a"), progress=False)
    cfg = tiny_config(steps=4, output=tmp_path / "b", **{"image.size": 64})
    with pytest.raises(CheckpointError, match="belongs to another run .*image_shape"):
        fit(cfg, resume=str(other.last_checkpoint), progress=False)
    assert not (tmp_path / "b").exists()


def test_unreadable_checkpoints_are_refused(tiny_config, tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        fit(tiny_config(), resume=str(junk), progress=False)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not written by nst-lightning"):
        fit(tiny_config(), resume=str(foreign), progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        fit(tiny_config(), resume="last", progress=False)


def test_a_previous_run_is_not_clobbered(tiny_config):
    out = fit(tiny_config(steps=2), progress=False)
    before = out.final.read_bytes()
    with pytest.raises(ConfigError, match='holds a previous run; add resume="last"'):
        fit(tiny_config(steps=3), progress=False)
    assert out.final.read_bytes() == before
    fit(tiny_config(steps=3), overwrite=True, progress=False)
    assert torch.load(out.last_checkpoint, weights_only=True)["global_step"] == 3


def test_module_works_in_a_user_trainer_with_callbacks_and_csv_logger(content_small, style_small, extractor, tmp_path):
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["style"]))

    module = StyleTransferModule(content_small, style_small, extractor=extractor)
    _run(module, 4, callbacks=[Record()], log_every_n_steps=1)
    assert len(seen) == 4 and seen[-1] < seen[0]
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=CSVLogger(tmp_path), enable_progress_bar=False,
                        enable_checkpointing=False, log_every_n_steps=1, callbacks=[ImageLogger(every_n_steps=2)])
    module = StyleTransferModule(content_small, style_small, extractor=extractor)
    trainer.fit(module)
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "content" in metrics and "style" in metrics
    images = sorted(tmp_path.rglob("images/image_step_*.png"))
    assert [p.name for p in images] == ["image_step_000002.png", "image_step_000003.png"]
    assert {p.name for p in tmp_path.rglob("images/*.png")} - {p.name for p in images} == {
        "side_by_side_step_000003.png", "loss_curve_step_000003.png"
    }
    assert images[0].parent.parent == Path(trainer.logger.log_dir)
    assert (read_image(images[-1]) - module.result()).abs().max() <= 1 / 255


@pytest.mark.parametrize("overrides", [{"trainer.devices": 2}, {"trainer.num_nodes": 2}, {"trainer.devices": "[0, 1]"}])
def test_a_single_image_refuses_several_devices_before_writing(tiny_config, overrides):
    cfg = tiny_config(**overrides)
    with pytest.raises(ConfigError, match="single image is optimised on one device"):
        fit(cfg, progress=False)
    assert not Path(cfg.output).exists()




def test_lbfgs_moves_even_when_the_scale_free_gradients_are_tiny(extractor):
    """A 256 px content close to its style gives tiny per-pixel gradients of the scale-free loss, where
    torch's L-BFGS used to skip every curvature pair and stand still (as it did for some photos at 256-512 px)."""
    from nst_lightning.config import EXAMPLE_STYLE
    from nst_lightning.images import load_image

    style = load_image(EXAMPLE_STYLE, 256)
    module = StyleTransferModule(style.flip(-1), style, extractor=extractor)
    start = module()["loss"].item()
    _run(module, 4)
    assert module()["loss"].item() < 0.9 * start


def test_margin_mirrors_the_image_for_vgg_and_keeps_the_output_and_content_aligned(content_small, style_small, extractor):
    module = StyleTransferModule(content_small, style_small, extractor=extractor, features={"margin": 6})
    assert module.image.shape == content_small.shape  # the margin is never part of the result
    framed = module.with_margin(content_small)
    assert framed.shape[-2:] == (content_small.shape[-2] + 12, content_small.shape[-1] + 12)
    torch.testing.assert_close(framed[..., 6:-6, 6:-6], content_small)
    torch.testing.assert_close(framed[..., 5, 6:-6], content_small[..., 1, :])  # mirrored about the edge line
    # content targets come from the content with the same margin: the starting image (the content) is on target
    assert module.loss_terms()["content"].item() == 0
    shifted = torch.roll(content_small, 3, dims=-1)
    assert module.loss_terms(shifted)["content"].item() > 0


def test_margin_the_image_cannot_mirror_is_refused(style_small, extractor):
    with pytest.raises(ConfigError, match="features.margin"):
        StyleTransferModule(torch.rand(1, 3, 20, 40), style_small, extractor=extractor, features={"margin": 20})


def test_masks_follow_the_output_onto_the_margin_canvas(content_small, style_small, extractor):
    mask = torch.zeros(1, 1, *content_small.shape[-2:])
    mask[..., :, : content_small.shape[-1] // 2] = 1
    module = StyleTransferModule(
        content_small, [style_small, style_small], extractor=extractor, style_masks=[mask, 1 - mask], features={"margin": 4}
    )
    assert module.style_masks[0].shape[-2:] == module.with_margin(content_small).shape[-2:]
    torch.testing.assert_close(module.style_masks[0][..., 4:-4, 4:-4], mask)
    assert torch.isfinite(module.loss_terms()["loss"]).all()


@pytest.mark.parametrize(
    ("argument", "bad", "message"),
    [
        ("content", "nan", r"content holds NaN or infinite values"),
        ("style", "inf", r"style 1 holds NaN or infinite values"),
        ("content", "uint8", r"content must be floating point in \[0, 1\], got torch.uint8; divide 8-bit values by 255"),
        ("style", "0..255", r"style 1 values must lie in \[0, 1\], got [\d.]+\.\.[\d.]+; divide 0\.\.255 values by 255"),
        ("content", "negative", r"content values must lie in \[0, 1\], got -0\.5\.\."),
        ("style", "rgba", r"style 1 must be an RGB image tensor \(1, 3, H, W\) or \(3, H, W\), got shape \(1, 4, \d+, 48\)"),
        ("content", "list", r"content must be a \(1, 3, H, W\) tensor or an image file path, got list"),
    ],
)
def test_tensors_are_checked_at_the_door_with_the_argument_and_the_rule_named(
    content_small, style_small, extractor, argument, bad, message
):
    good = {"content": content_small, "style": style_small}
    image = good[argument].clone()
    broken = {
        "nan": lambda: image.index_put_((torch.tensor([0]),), torch.tensor(float("nan"))),
        "inf": lambda: image.index_put_((torch.tensor([0]),), torch.tensor(float("inf"))),
        "uint8": lambda: (image * 255).to(torch.uint8),
        "0..255": lambda: image * 255,
        "negative": lambda: image - 0.5,
        "rgba": lambda: torch.cat([image, image[:, :1]], 1),
        "list": lambda: image.tolist(),
    }[bad]()
    with pytest.raises(ValueError, match=message):
        StyleTransferModule(**{**good, argument: broken}, extractor=extractor)


def test_three_dimensional_content_and_style_are_taken_alike(content_small, style_small, extractor):
    module = StyleTransferModule(content_small[0], style_small[0], extractor=extractor)
    assert module.image.shape == content_small.shape
    assert torch.equal(module.style_images[0][0], style_small)
