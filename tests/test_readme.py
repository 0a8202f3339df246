"""The README's Python examples run as written from a scratch directory (no path rewritten) and do what they say."""

from __future__ import annotations

import ast
import csv
import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT


def test_readme_python_examples_run_from_any_directory_and_print_what_they_promise(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its python examples"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    printed = {}
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        printed[code] = ast.literal_eval(r.stdout.strip().splitlines()[-1])

    [names] = [out for code, out in printed.items() if "StylePairsDataModule(" in code]
    assert names == ["astronaut__starry_night.png", "starry_night__starry_night.png", "the_scream__starry_night.png"]
    assert all((tmp_path / "runs" / "batch" / name).is_file() for name in names)

    [terms] = [out for code, out in printed.items() if "module()" in code]
    assert set(terms) == {"content", "style", "smoothness", "loss"}
    assert terms["style"] > 0 and terms["content"] > 0 and terms["smoothness"] > 0  # the default colour smoothness
    assert terms["loss"] == pytest.approx(terms["content"] + terms["style"] + terms["smoothness"], abs=3e-4)
    assert (tmp_path / "runs" / "py" / "final.png").is_file()
    logs = tmp_path / "runs" / "csv" / "lightning_logs" / "version_0"
    with (logs / "metrics.csv").open(newline="") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh) if row.get("loss")]
    assert steps[:2] == [4, 9]  # log_every_n_steps=5, counted from 0 as the README says
    assert {"side_by_side", "loss_curve"} <= {p.name.rsplit("_step_", 1)[0] for p in (logs / "images").iterdir()}
