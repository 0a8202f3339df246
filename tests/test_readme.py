"""The README's Python example runs as written (in a scratch directory)."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import ROOT


def test_readme_python_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    examples = str(ROOT / "nst_lightning" / "examples") + "/"
    for code in blocks:
        code = code.replace("nst_lightning/examples/", examples)
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "runs" / "py" / "final.png").is_file()
    assert "'style':" in r.stdout
