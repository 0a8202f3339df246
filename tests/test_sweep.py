"""Weight sweeps: grid parsing, one validated config per combination, shared network and targets, the sheet."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nst_lightning import features, losses
from nst_lightning.config import load_config
from nst_lightning.errors import ConfigError
from nst_lightning.images import read_image
from nst_lightning.sweep import grid_cells, parse_grid, sweep

from .conftest import tiny_overrides


def test_grid_values_are_yaml_split_at_top_level_commas():
    grid = parse_grid(["loss.style_weight=1e2,1e3", "scales=[32,48],[48,64]", "color=none,luminance"])
    assert grid == {"loss.style_weight": ["1e2", "1e3"], "scales": [[32, 48], [48, 64]], "color": ["none", "luminance"]}


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        (["loss.style_weight"], "not of the form key=v1,v2"),
        (["loss.style_weight=1,,2"], "not of the form key=v1,v2"),
        (["a=1", "a=2"], "names a twice"),
    ],
)
def test_bad_grid_items_are_refused(items, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_grid(items)


def test_every_combination_becomes_a_validated_config_in_its_own_directory(tmp_path):
    base = load_config(None, [f"output={tmp_path}", "image.size=64"])
    cells = grid_cells(base, parse_grid(["loss.style_weight=1e2,1e3,1e4", "loss.tv_weight=0,1e-3"]))
    assert [(c.config.loss.style_weight, c.config.loss.tv_weight) for c in cells] == [
        (100.0, 0.0), (100.0, 0.001), (1000.0, 0.0), (1000.0, 0.001), (10000.0, 0.0), (10000.0, 0.001)
    ]
    assert {c.config.image.size for c in cells} == {64}
    assert len({c.config.output for c in cells}) == 6 and all(c.config.output.startswith(str(tmp_path)) for c in cells)


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        (["loss.style_wieght=1,2"], "did you mean 'style_weight'"),
        (["loss.style_weight=-1,2"], "sweep cell loss.style_weight=-1"),
        (["output=a,b"], "cannot sweep output"),
    ],
)
def test_a_bad_cell_is_refused_before_anything_runs(tmp_path, items, fragment):
    base = load_config(None, [f"output={tmp_path / 's'}"])
    with pytest.raises(ConfigError, match=fragment):
        grid_cells(base, parse_grid(items))
    assert not (tmp_path / "s").exists()


def test_a_sweep_runs_every_cell_on_one_network_and_one_set_of_targets(tmp_path, monkeypatch):
    built, targeted = [], []
    real_build, real_targets = features.build_extractor, losses.StyleTransferLoss.set_targets
    monkeypatch.setattr(features, "build_extractor", lambda *a, **k: built.append(1) or real_build(*a, **k))
    monkeypatch.setattr(losses.StyleTransferLoss, "set_targets", lambda *a, **k: targeted.append(1) or real_targets(*a, **k))
    base = load_config(None, tiny_overrides(tmp_path / "sweep", steps=3, **{"image.size": 32, "checkpoint.every_n_steps": 10}))
    out = sweep(base, parse_grid(["loss.style_weight=0,1e3", "loss.content_weight=1,0"]), progress=False)
    assert (len(built), len(targeted)) == (1, 1)

    results = [read_image(cell / "final.png") for cell in out.cells]
    assert len(results) == 4
    assert (results[0] - results[2]).abs().mean() > 0.02  # style weight 0 vs 1e3: the cells really differ
    sheet = read_image(out.sheet)
    assert sheet.shape[-1] > 2 * 160 and sheet.shape[-2] > 3 * 160  # header + two rows of two 160 px cells
    rows = out.summary.read_text().splitlines()
    assert rows[0] == "cell,loss.style_weight,loss.content_weight,content,style,smoothness,loss,final"
    assert [r.split(",")[1:3] for r in rows[1:]] == [["0", "1"], ["0", "0"], ["1e3", "1"], ["1e3", "0"]]

    with pytest.raises(ConfigError, match="holds a previous sweep"):
        sweep(base, parse_grid(["loss.style_weight=0"]), progress=False)


def test_a_sweep_summarises_the_cells_it_ran_from_memory_and_reads_only_cells_finished_before(tmp_path, monkeypatch):
    from nst_lightning import images, plots

    read = {"images": [], "losses": []}  # what the sweep's summary reads (the cells' own plots read their CSVs)
    real_read_image, real_read_losses = images.read_image, plots.read_losses

    def by_summary(kind, real):
        def reading(path, *args, **kwargs):
            if "_summarise" in (sys._getframe(1).f_code.co_name, sys._getframe(2).f_code.co_name):  # or its listcomp
                read[kind].append(Path(path))
            return real(path, *args, **kwargs)
        return reading

    monkeypatch.setattr(images, "read_image", by_summary("images", real_read_image))
    monkeypatch.setattr(plots, "read_losses", by_summary("losses", real_read_losses))
    base = load_config(None, tiny_overrides(tmp_path / "sweep", steps=2, **{"image.size": 32}))
    out = sweep(base, parse_grid(["loss.style_weight=0,1e3"]), progress=False)
    assert read == {"images": [], "losses": []}
    rows = [r.split(",") for r in out.summary.read_text().splitlines()[1:]]
    for row, cell in zip(rows, out.cells):  # the figures in memory are the ones the cell's files hold
        last = {k: v[-1] for k, v in real_read_losses(cell / "losses.csv").items()}
        assert float(row[3]) == pytest.approx(last["style"], rel=1e-4) and float(row[4]) == pytest.approx(last["smoothness"], abs=1e-9)

    read["images"].clear()
    again = sweep(base, parse_grid(["loss.style_weight=0,1e3"]), resume=True, progress=False)  # both finished before
    assert sorted(p.parent.name for p in read["images"]) == sorted(p.parent.name for p in read["losses"]) == ["00", "01"]
    assert again.summary.read_text() == out.summary.read_text()
