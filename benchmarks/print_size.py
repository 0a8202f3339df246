r"""Print size: one loss evaluation (forward, backward, input gradient) tiled and untiled, seconds and peak memory.

Every configuration runs in a fresh process, whose peak RSS (``VmHWM``) is its own; targets (content features,
style Grams) are computed first and timed apart. Untiled configurations whose memory estimate exceeds the free
memory are skipped, not run into the out-of-memory killer. The content is the bundled astronaut cut to 4:3
(``size`` x ``3/4 size``), the style the bundled Starry Night at the same long side (``image.style_scale=1``),
the default loss layers, fp32 unless ``--precision bf16``.

    python benchmarks/print_size.py                          # 1024 and 2048 px, tiled (512 px) and untiled
    python benchmarks/print_size.py --sizes 4096 --modes tiled --tile 1024

Prints a Markdown table; on CUDA (``--device cuda``) it adds the peak reserved GPU memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024**3


def peak_rss() -> int:
    """This process's peak resident set (``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(size: int, tile: int, precision: str, device: str) -> dict[str, float]:
    """One configuration in this (fresh) process: targets, then one timed evaluation."""
    import torch

    from nst_lightning.config import EXAMPLE_CONTENT, EXAMPLE_STYLE
    from nst_lightning.images import load_image
    from nst_lightning.module import StyleTransferModule

    content = load_image(EXAMPLE_CONTENT, size)[..., : size * 3 // 4, :].contiguous()
    style = load_image(EXAMPLE_STYLE, size)
    module = StyleTransferModule(content, style, features={"tile": tile or "off"}).to(device)
    module.network = module.extractor.converted(torch.bfloat16 if precision == "bf16" else torch.float32)
    module._scale_ready = True  # the objective's scale needs one more backward at the first step only
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    module.prepare_targets()
    sync()
    targets = time.perf_counter() - start
    start = time.perf_counter()
    module.evaluate()
    sync()
    seconds = time.perf_counter() - start
    out = {"targets_s": targets, "eval_s": seconds, "rss": peak_rss()}
    if device == "cuda":
        out["cuda_reserved"] = torch.cuda.max_memory_reserved()
    return out


def estimate(size: int, tile: int, precision: str) -> int:
    """The package's memory estimate for the configuration, in bytes."""
    from nst_lightning.config import DEFAULT_STYLE_LAYERS
    from nst_lightning.memory import estimate_memory

    shape = (size * 3 // 4, size)
    style = (size * 5 // 8, size)  # starry_night.jpg is 512x320
    layers = [*DEFAULT_STYLE_LAYERS, "relu4_2"]
    return estimate_memory(shape, [style], layers, precision="bf16-mixed" if precision == "bf16" else "32-true", tile=tile).total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="long sides in pixels")
    parser.add_argument("--modes", default="tiled,untiled", help="tiled, untiled or both (comma-separated)")
    parser.add_argument("--tile", type=int, default=512, help="features.tile of the tiled runs")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", nargs=2, type=int, metavar=("SIZE", "TILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.precision, args.device)))
        return

    from nst_lightning.free_memory import available_cpu_memory

    modes = args.modes.split(",")
    print(f"| size | evaluation | targets s | s/eval | peak RSS GiB | estimate GiB |{' GPU reserved GiB |' if args.device == 'cuda' else ''}")
    print(f"|---|---|---|---|---|---|{'---|' if args.device == 'cuda' else ''}")
    for size in args.sizes:
        for mode in modes:
            tile = args.tile if mode == "tiled" else 0
            label = f"tiled {tile} px" if tile else "untiled"
            need = estimate(size, tile, args.precision)
            free = available_cpu_memory()
            name = f"| {size}x{size * 3 // 4} | {label} |"
            if args.device == "cpu" and free is not None and need > free:
                print(f"{name} - | - | skipped | {need / GiB:.1f} (free {free / GiB:.1f}) |", flush=True)
                continue
            cmd = [sys.executable, __file__, "--worker", str(size), str(tile), "--precision", args.precision, "--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name} - | - | failed ({done.stderr.strip().splitlines()[-1:]}) | {need / GiB:.1f} |", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            gpu = f" {r['cuda_reserved'] / GiB:.2f} |" if "cuda_reserved" in r else ""
            print(f"{name} {r['targets_s']:.1f} | {r['eval_s']:.1f} | {r['rss'] / GiB:.2f} | {need / GiB:.1f} |{gpu}", flush=True)


if __name__ == "__main__":
    main()
