"""Huge pages for large images: asked for only from the measured size on, never over the user's own choice."""

from __future__ import annotations

import os
import subprocess
import sys

from nst_lightning import allocator


def test_huge_pages_are_requested_from_the_measured_size_on(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert not allocator.request_huge_pages(allocator.MIN_SIDE - 1)
    assert allocator.ENV not in os.environ
    assert allocator.request_huge_pages(allocator.MIN_SIDE)
    assert os.environ[allocator.ENV] == "1"


def test_the_users_own_setting_wins(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "0")
    assert not allocator.request_huge_pages(4096)
    assert os.environ[allocator.ENV] == "0"


def test_the_cli_asks_before_torch_starts(tmp_path):
    # a run far too large for the machine stops at the memory check; the switch must be set by then
    # and torch must not have been imported before it was
    probe = (
        "import sys, os\n"
        "from nst_lightning import allocator\n"
        "seen = {}\n"
        "real = allocator.request_huge_pages\n"
        "def spy(side):\n"
        "    seen['torch_loaded'] = 'torch' in sys.modules\n"
        "    return real(side)\n"
        "allocator.request_huge_pages = spy\n"
        "import nst_lightning.cli as cli\n"
        "cli.request_huge_pages = spy\n"
        "sys.argv = ['nst-lightning', 'fit', '--set', 'image.size=16384', '--set', 'trainer.accelerator=cpu', '-o', sys.argv[1]]\n"
        "try:\n"
        "    cli.run()\n"
        "except SystemExit as e:\n"
        "    print(seen, os.environ.get('THP_MEM_ALLOC_ENABLE'), e.code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")], capture_output=True, text=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "{'torch_loaded': False} 1 2", out.stdout + out.stderr
