"""Benchmark worker: one pastiche run (the peer), timed per L-BFGS step like run_ours.py; prints JSON.

Uses pastiche's own PasticheArtist with its defaults (L-BFGS max_iter=1, lr 1, history 100), at the
same content size and style image as nst-lightning, on the CPU.
"""

from __future__ import annotations

import json
import os
import time

T0 = time.perf_counter()

from worker_args import worker_parser  # noqa: E402

import torch  # noqa: E402
from pastiche.pastiche import PasticheArtist, save_image  # noqa: E402


def main() -> None:
    p = worker_parser()
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    os.makedirs(os.path.join(args.output, "snapshots"), exist_ok=True)
    artist = PasticheArtist(args.content, [args.style], size=args.size, style_size=args.size, device=args.device)
    times: list[float] = []
    start = time.perf_counter()
    for step in range(1, args.evals + 1):
        artist.draw()
        if args.device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if args.snapshot_every and step % args.snapshot_every == 0:
            pause = time.perf_counter()
            save_image(artist.pastiche, os.path.join(args.output, "snapshots", f"step_{step:06d}.png"))
            start += time.perf_counter() - pause
    save_image(artist.pastiche, os.path.join(args.output, "final.png"))
    print(json.dumps({"step_times": times, "setup_s": start - T0, "precision": "32-true"}))


if __name__ == "__main__":
    main()
