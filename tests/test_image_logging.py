"""Progress images reach TensorBoard through the user's own TensorBoardLogger (tensorboard is a test dependency)."""

from __future__ import annotations

import lightning as L

from nst_lightning.image_logging import ImageLogger
from nst_lightning.module import StyleTransferModule


def test_images_are_logged_to_tensorboard(content_small, style_small, extractor, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=logger, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[ImageLogger(every_n_steps=2, tag="stylised")])
    trainer.fit(StyleTransferModule(content_small, style_small, extractor=extractor))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert [(e.step, e.width, e.height) for e in events.Images("stylised")] == [(2, 48, 48), (3, 48, 48)]
    assert not list(tmp_path.rglob("*.png"))
