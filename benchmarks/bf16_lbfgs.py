"""Does bf16 L-BFGS still need the objective scale and the dropped first curvature pair? Loss curves under bf16-mixed.

Each case runs 10 steps under ``trainer.precision=bf16-mixed`` with the two safeguards on or off (patched in this
process only) and prints the largest rise of the loss from one step to the next, the final loss over the first,
and, for the photo case, how far the result moved from the photo and how many pixels saturated. Run it against
another checkout with ``PYTHONPATH=/path/to/it`` to compare code versions. Needs a CPU with native bf16 to be
quick (on an AVX2-only CPU bf16 is emulated, about 10x slower).

    python benchmarks/bf16_lbfgs.py
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from nst_lightning import fit, load_config
from nst_lightning.config import EXAMPLE_CONTENT
from nst_lightning.images import read_image
from nst_lightning.module import StyleTransferModule
from nst_lightning.optim import BatchedLBFGS

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def safeguards(scale: bool, skip_first_pair: bool) -> Iterator[None]:
    """Turn the objective scale (1 instead of 1/mean|grad|) and L-BFGS's dropped first pair off for this block."""
    set_scale, init = StyleTransferModule._set_objective_scale, BatchedLBFGS.__init__

    def unit_scale(self, losses):
        with torch.no_grad():
            self.objective_scale.fill_(1.0)
        self._scale_ready = True

    def keep_first_pair(self, *args, **kwargs):
        kwargs["skip_first_pair"] = False
        init(self, *args, **kwargs)

    if not scale:
        StyleTransferModule._set_objective_scale = unit_scale
    if not skip_first_pair:
        BatchedLBFGS.__init__ = keep_first_pair
    try:
        yield
    finally:
        StyleTransferModule._set_objective_scale, BatchedLBFGS.__init__ = set_scale, init


def run(case: str, photo: Path, steps: int, tmp: Path) -> dict[str, float]:
    common = [f"output={tmp}", f"trainer.max_steps={steps}", "trainer.precision=bf16-mixed", "trainer.accelerator=cpu",
              "trainer.log_every_n_steps=1", "snapshot.every_n_steps=0"]
    if case == "photo96":
        cfg = load_config(None, [f"content={photo}", "image.size=96", *common])
    else:  # the paper's objective (loss ~1e13 a pixel unscaled), from noise
        cfg = load_config(ROOT / "configs" / "gatys2015.yaml", ["image.size=128", "optim.max_iter=1", *common])
    outputs = fit(cfg, progress=False)
    with open(Path(cfg.output) / "losses.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    rises = [b / a for a, b in zip(losses, losses[1:]) if a > 0]
    out = {"largest rise": max(rises), "last / first": losses[-1] / losses[0]}
    if case == "photo96":
        result, start = read_image(outputs.final), read_image(photo)
        out["moved"] = float((result - start).abs().mean())
        out["saturated"] = float(((result == 0) | (result == 1)).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "crop.png"
        Image.open(EXAMPLE_CONTENT).convert("RGB").crop((100, 60, 420, 300)).resize((96, 72)).save(photo)
        print("| case | objective scale | drop first pair | largest step-to-step rise | last / first loss | moved | saturated |")
        print("|---|---|---|---|---|---|---|")
        for case in ("photo96", "gatys2015-128"):
            for scale, skip in ((True, True), (True, False), (False, True), (False, False)):
                with safeguards(scale, skip):
                    r = run(case, photo, args.steps, Path(tmp) / f"{case}-{scale}-{skip}")
                extra = f"{r['moved']:.4f} | {r['saturated']:.4f}" if "moved" in r else "- | -"
                print(f"| {case} | {'on' if scale else 'off'} | {'on' if skip else 'off'} | {r['largest rise']:.4g} | "
                      f"{r['last / first']:.4g} | {extra} |", flush=True)


if __name__ == "__main__":
    main()
