"""Progress pictures reach whichever Lightning logger is attached, each in the way it takes images."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger
from PIL import Image

from nst_lightning.image_logging import ImageLogger, log_picture
from nst_lightning.module import StyleTransferModule


def _trainer(logger, callback, steps=3):
    return L.Trainer(max_steps=steps, accelerator="cpu", precision="32-true", logger=logger, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1, callbacks=[callback])


def test_images_side_by_side_and_loss_curve_are_logged_to_tensorboard(content_small, style_small, extractor, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    _trainer(logger, ImageLogger(every_n_steps=2, tag="stylised")).fit(
        StyleTransferModule(content_small, style_small, extractor=extractor)
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert [(e.step, e.width, e.height) for e in events.Images("stylised")] == [(2, 48, 48), (3, 48, 48)]
    [picture] = events.Images("side_by_side")
    assert picture.step == 3 and picture.width > 3 * picture.height  # content | style | result in one row
    assert [(e.step, e.width, e.height) for e in events.Images("loss_curve")] == [(3, 640, 400)]
    assert not list(tmp_path.rglob("*.png"))


def test_a_logger_without_an_image_api_gets_files_in_its_folder(content_small, style_small, extractor, tmp_path):
    logger = CSVLogger(tmp_path)
    _trainer(logger, ImageLogger(every_n_steps=2)).fit(StyleTransferModule(content_small, style_small, extractor=extractor))
    names = sorted(p.name for p in (tmp_path / "lightning_logs" / "version_0" / "images").iterdir())
    assert names == ["image_step_000002.png", "image_step_000003.png", "loss_curve_step_000003.png",
                     "side_by_side_step_000003.png"]


class _MLflow(MLFlowLogger):
    """An MLFlowLogger that records what reaches its client (mlflow itself need not be installed)."""

    def __init__(self) -> None:
        self.calls = []

    @property
    def experiment(self):
        return self

    @property
    def run_id(self) -> str:
        return "run-1"

    def log_image(self, run_id, image, artifact_file):
        self.calls.append((run_id, image.size, artifact_file))


class _Wandb(WandbLogger):
    """A WandbLogger that records its log_image calls (wandb itself need not be installed)."""

    def __init__(self) -> None:
        self.calls = []

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append((key, [im.size for im in images], step))


def test_mlflow_and_wandb_loggers_get_their_own_image_calls():
    picture = Image.new("RGB", (40, 30))
    mlflow, wandb = _MLflow(), _Wandb()
    log_picture(mlflow, "side_by_side", picture, 7)
    log_picture(wandb, "side_by_side", picture, 7)
    assert mlflow.calls == [("run-1", (40, 30), "side_by_side/step_000007.png")]
    assert wandb.calls == [("side_by_side", [(40, 30)], 7)]
