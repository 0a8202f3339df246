"""Images per minute of a batch run with batching off (one image per VGG pass) and on (several per pass).

Runs ``fit_batch`` end to end on crops of the bundled photo, in a temporary folder:

    python benchmarks/batch_throughput.py                      # 8 images, 64 px, 20 L-BFGS steps, CPU
    python benchmarks/batch_throughput.py --accelerator cuda --images 32 --size 256 --per-device 16

``optimising`` counts the optimisation loops only (what batching changes); ``end to end`` is the wall
time of the whole call (Trainer start, weights, image loading and writing included). The settings
alternate over ``--repeats`` rounds and each shows its best round, as other load on a shared machine
only ever slows a round down.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

from PIL import Image

from nst_lightning import fit_batch
from nst_lightning.config import EXAMPLE_CONTENT, load_config


def make_images(folder: Path, count: int, side: int) -> None:
    """``count`` different square crops of the bundled photo, ``side`` pixels each."""
    folder.mkdir(parents=True)
    photo = Image.open(EXAMPLE_CONTENT).convert("RGB")
    step = max(1, (photo.width - photo.height // 2) // count)
    for i in range(count):
        photo.crop((i * step, 0, i * step + photo.height // 2, photo.height // 2)).resize((side, side)).save(
            folder / f"img{i:03d}.png"
        )


def measure(root: Path, args: argparse.Namespace, per_device: int, steps: int, name: str) -> tuple[float, float]:
    """(images/min optimising, images/min end to end) for one setting, in a fresh output folder."""
    out = root / name
    cfg = load_config(
        None,
        [
            f"content={root / 'images'}",
            f"output={out}",
            f"image.size={args.size}",
            f"trainer.max_steps={steps}",
            f"trainer.accelerator={args.accelerator}",
            f"optim.name={args.optim}",
            f"batch.images_per_device={per_device}",
        ],
    )
    start = time.perf_counter()
    report = fit_batch(cfg, progress=False)
    wall = time.perf_counter() - start
    optimising = sum(r.seconds for r in report.done)
    return 60 * len(report.done) / optimising, 60 * len(report.done) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-device", type=int, default=8, help="images per VGG pass with batching on")
    parser.add_argument("--optim", choices=["lbfgs", "adam"], default="lbfgs")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best rate of each setting is shown")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "images", args.images, args.size)
        for per_device in (1, args.per_device):  # warm-up: weights read, kernels chosen for both batch sizes
            measure(root, args, per_device, 1, f"warmup_{per_device}")
        print(
            f"batch throughput ({args.accelerator}, {args.images} images {args.size}x{args.size}, "
            f"{args.steps} {args.optim} steps each, best of {args.repeats}): images/min optimising | end to end"
        )
        settings = {"batching off": 1, f"batching on ({args.per_device} per pass)": args.per_device}
        best = {label: (0.0, 0.0) for label in settings}
        for repeat in range(args.repeats):  # alternate the settings so load from elsewhere hits both alike
            for label, per_device in settings.items():
                rates = measure(root, args, per_device, args.steps, f"out_{per_device}_{repeat}")
                best[label] = (max(best[label][0], rates[0]), max(best[label][1], rates[1]))
        for label, (loop, total) in best.items():
            print(f"  {label:<28} {loop:8.1f} | {total:8.1f}")


if __name__ == "__main__":
    main()
