"""Pictures: each panel and cell lands where its label says, and every run writes its plots."""

from __future__ import annotations

import torch

from nst_lightning.api import fit
from nst_lightning.images import read_image
from nst_lightning.plots import contact_sheet, loss_curve, side_by_side

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def _solid(rgb, h=40, w=60):
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, h, w).clone()


def _colour_at(image, x_frac, y_frac):
    h, w = image.shape[-2:]
    return image[0, :, int(y_frac * h), int(x_frac * w)]


def test_side_by_side_shows_content_style_result_left_to_right(tmp_path):
    path = side_by_side(_solid(RED), [_solid(GREEN)], _solid(BLUE), tmp_path / "s.png")
    img = read_image(path)
    assert img.shape[-1] > 2.5 * img.shape[-2]
    for x, rgb in [(1 / 6, RED), (3 / 6, GREEN), (5 / 6, BLUE)]:
        torch.testing.assert_close(_colour_at(img, x, 0.6), torch.tensor(rgb), atol=0.05, rtol=0)


def test_contact_sheet_places_results_by_row_and_column(tmp_path):
    colours = [[RED, GREEN], [BLUE, (1.0, 1.0, 0.0)]]
    results = [[_solid(c, 40, 40) for c in row] for row in colours]
    path = contact_sheet(_solid((0.5, 0.5, 0.5), 40, 40), [_solid((0.0, 0.0, 0.0), 40, 40)], results,
                         ["a = 1", "a = 2"], ["b = x", "b = y"], tmp_path / "sheet.png", cell_px=100)
    img = read_image(path)
    h, w = img.shape[-2:]
    gap, title = 6, 20
    label = 12 + round(5.6 * len("a = 1"))  # the row labels' column, sized to the longest label
    top = 2 * title + 100 + 2 * gap  # below the header row and the column labels
    for r, row in enumerate(colours):
        for c, rgb in enumerate(row):
            y = top + r * (100 + gap) + 50
            x = label + c * (100 + gap) + 50
            torch.testing.assert_close(img[0, :, y, x], torch.tensor(rgb), atol=0.05, rtol=0)


def test_loss_curve_draws_a_history_with_an_all_zero_term_and_stage_lines(tmp_path):
    csv = tmp_path / "losses.csv"
    csv.write_text("step,content,style,smoothness,loss\n" + "".join(f"{i},{1 / i},{10 / i},0,{11 / i}\n" for i in range(1, 30)))
    assert read_image(loss_curve(csv, tmp_path / "curve.png", stage_starts=[10])).shape[-2:] == (400, 640)


def test_every_run_writes_a_loss_curve_and_side_by_side(tiny_config):
    out = fit(tiny_config(steps=2), progress=False)
    assert read_image(out.loss_curve).shape[-2:] == (400, 640)
    pair = read_image(out.side_by_side)
    assert pair.shape[-1] > 2.5 * pair.shape[-2]
