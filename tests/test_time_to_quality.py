"""benchmarks/time_to_quality.py's bookkeeping: the optimisation time read from the CLI's progress lines adds up
every coarse-to-fine stage, every recipe is a valid example config, and a recipe qualifies only on all three
judged distances and the time budget together."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def ttq(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("time_to_quality")


def test_optimisation_seconds_add_the_last_running_mean_of_each_stage(ttq: ModuleType) -> None:
    progress = "\n".join([
        "Stage 1/2 (160 px): step 100/200 (50%), 0.50 s/step, loss=2.0e+00",
        "Stage 1/2 (160 px): step 200/200 (100%), 0.40 s/step, loss=1.0e+00",
        "wrote nothing in between",
        "Stage 2/2 (320 px): step 10/70 (14%), 2.00 s/step",
        "Stage 2/2 (320 px): step 70/70 (100%), 1.50 s/step",
    ])
    assert ttq.optimisation_seconds(progress) == pytest.approx(200 * 0.40 + 70 * 1.50)
    assert ttq.optimisation_seconds("Stylising: step 300/300 (100%), 2.10 s/step") == pytest.approx(630)


def test_every_recipe_is_a_valid_example_config_ending_at_its_size(ttq: ModuleType) -> None:
    for name, items in ttq.RECIPES.items():
        stages = ttq.steps_per_scale(items).split(" + ")
        assert stages[-1].startswith("320x"), name


def _figures(wall: float, style: float = 1.0, sw: float = 1.0, content: float = 1.0) -> dict:
    return {"wall_s": wall, "style": style, "style_sw": sw, "content": content}


def test_a_recipe_qualifies_only_within_tolerance_on_all_three_and_in_budget(ttq: ModuleType) -> None:
    base = _figures(100.0)
    assert ttq.qualifies(_figures(40.0, 1.02, 0.9, 1.03), base, 0.03, 0.40)
    assert not ttq.qualifies(_figures(41.0), base, 0.03, 0.40)
    assert not ttq.qualifies(_figures(30.0, style=1.04), base, 0.03, 0.40)
    assert not ttq.qualifies(_figures(30.0, sw=1.04), base, 0.03, 0.40)
    assert not ttq.qualifies(_figures(30.0, content=1.04), base, 0.03, 0.40)
