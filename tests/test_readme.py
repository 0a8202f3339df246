"""The README's Python examples run as written (in a scratch directory) and print what they promise."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from .conftest import ROOT


def test_readme_python_examples_run_and_print_what_they_promise(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    examples = str(ROOT / "nst_lightning" / "examples") + "/"
    printed = {}
    for code in blocks:
        code = code.replace("nst_lightning/examples/", examples)
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        printed[code] = ast.literal_eval(r.stdout.strip().splitlines()[-1])

    [names] = [out for code, out in printed.items() if "expand_pairs" in code]
    assert names == ["astronaut__starry_night.png", "starry_night__starry_night.png", "the_scream__starry_night.png"]
    assert all((tmp_path / "runs" / "batch" / name).is_file() for name in names)

    [terms] = [out for code, out in printed.items() if "module()" in code]
    assert set(terms) == {"content", "style", "tv", "loss"}
    assert terms["style"] > 0 and terms["content"] > 0 and terms["tv"] == 0  # the snippet sets no TV weight
    assert terms["loss"] == pytest.approx(terms["content"] + terms["style"] + terms["tv"], abs=3e-4)
    assert (tmp_path / "runs" / "py" / "final.png").is_file()
