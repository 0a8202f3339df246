"""Speed, memory and quality of nst-lightning against pastiche, in one run on one machine.

Each system runs in its own process on the same content/style pair, size and number of L-BFGS
evaluations (one per step for both: pastiche's L-BFGS uses max_iter=1), so step counts compare.
Reported per size: seconds per evaluation inside the optimisation, optimisation time, whole-process
wall time (start-up included), peak RSS, and the quality of the saved images by one fixed judge
(nst_lightning.judge: mean relative Gram distance over relu1_1..relu5_1, relative relu4_2 feature
distance, caffe VGG19). Also: the time each needs to reach pastiche's final quality, a large-size
memory line, and how fast `nst-lightning --help` answers. Writes a Markdown table.

nst-lightning runs at the package's own precision choice (``trainer.precision=auto``: bf16 only where the
CPU runs it natively, fp32 where it would be emulated, as on AVX2-only CPUs, where bf16 is ~10x slower);
each run prints the precision it used.

    python benchmarks/benchmark.py                      # CPU defaults: 256 and 512 px, 300 evaluations
    python benchmarks/benchmark.py --sizes 256 --evals 50 --big 0 --results /tmp/quick.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "images"
BUNDLED = ROOT / "nst_lightning" / "examples"
HAS_SHARED = (SHARED / "tubingen.jpg").is_file()
DEFAULT_CONTENT = SHARED / "tubingen.jpg" if HAS_SHARED else BUNDLED / "astronaut.jpg"
DEFAULT_STYLE = SHARED / "starry_night.jpg" if HAS_SHARED else BUNDLED / "starry_night.jpg"
"""The classic Gatys pair where the project's sample folder sits beside the clone; the bundled pair elsewhere."""


@dataclass
class Run:
    """One process's figures."""

    system: str
    size: int
    evals: int
    wall_s: float
    rss_mb: float
    setup_s: float
    step_times: list[float]
    output: Path
    precision: str
    quality: tuple[float, float, float] = (float("nan"), float("nan"), float("nan"))  # style, content, style_sw
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    gpu_peak_bytes: int = 0
    details: dict = field(default_factory=dict)
    """Everything else the worker reported (GPU memory, CUDA graph counts, one-time costs)."""

    @property
    def opt_s(self) -> float:
        return self.step_times[-1] if self.step_times else float("nan")

    @property
    def s_per_eval(self) -> float:
        return self.opt_s / max(1, len(self.step_times))


@dataclass
class Row:
    """One size: nst-lightning at the compared precision, pastiche (unless skipped), nst-lightning at other precisions."""

    ours: Run
    peer: Run | None
    others: list[Run]

    def __iter__(self):
        return iter((self.ours, self.peer, self.others))


def source_env() -> dict[str, str]:
    """This process's environment with the source tree first on ``PYTHONPATH``: workers import this checkout's
    package whether or not it is installed (the GPU machine runs it from the tree, with nothing installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_worker(system: str, script: str, args: list[str], size: int, evals: int, output: Path) -> Run:
    """Run a worker script in a fresh process; measure its wall time and peak RSS (ru_maxrss).

    The worker gets a process group of its own: if this process is interrupted while waiting (a caller's time
    limit raising from a signal handler), the worker and anything it started are killed, not left running.
    """
    cmd = [sys.executable, str(HERE / script), *args]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=source_env(), start_new_session=True)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            kill_group(proc)
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{system} failed ({proc.returncode}):\n{errors[-3000:]}")
    data = json.loads(text.strip().splitlines()[-1])
    return Run(system, size, evals, wall, usage.ru_maxrss / 1024, data.pop("setup_s"), data.pop("step_times"), output,
               data.pop("precision"), gpu_peak_bytes=data.pop("gpu_peak_bytes", 0), details=data)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a child started with ``start_new_session=True`` and its whole process group, and reap it."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()


def judge_run(run: Run, judge, content_path: Path, style_path: Path) -> None:
    """Score the final image and every snapshot (the quality curve used for time-to-quality)."""
    from nst_lightning.images import load_image

    final = load_image(run.output / "final.png")
    content = load_image(content_path)
    style = load_image(style_path, max(final.shape[-2:]))
    q = judge(final, content, style)
    run.quality = (q.style, q.content, q.style_sw)
    for snap in sorted((run.output / "snapshots").glob("step_*.png")):
        step = int(snap.stem.split("_")[1])
        qs = judge(load_image(snap), content, style)
        run.curve.append((step, qs.style, qs.content))


def time_to_quality(run: Run, target: tuple[float, float]) -> tuple[int, float] | None:
    """First snapshot step where both distances are at or below ``target``, and the time to reach it."""
    for step, style, content in run.curve:
        if style <= target[0] and content <= target[1]:
            return step, run.step_times[step - 1]
    return None


def help_seconds() -> float:
    """Best of five wall times of `nst-lightning --help` (console script of this interpreter)."""
    exe = Path(sys.executable).with_name("nst-lightning")
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([str(exe), "--help"], capture_output=True, check=True)
        best = min(best, time.perf_counter() - t)
    return best


def machine() -> str:
    """CPU model, cores and library versions, for the results header."""
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{model}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--content", type=Path, default=DEFAULT_CONTENT)
    p.add_argument("--style", type=Path, default=DEFAULT_STYLE)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--evals", type=int, default=300, help="L-BFGS evaluations (= steps) per run")
    p.add_argument("--snapshot-every", type=int, default=20)
    p.add_argument(
        "--precision", default="auto",
        help="nst-lightning's trainer.precision, compared with pastiche (auto: the package's choice for this CPU)",
    )
    p.add_argument(
        "--also-precision", nargs="*", default=None,
        help="more nst-lightning precisions to run at each size, to show which default is best on this machine "
        "(default: 32-true where the compared precision is bf16; a precision equal to the compared one is not rerun)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="another nst-lightning setting for each of its runs (optim.precondition_levels=0: plain L-BFGS, as the "
        "README's table was measured)",
    )
    p.add_argument("--big", type=int, default=2048, help="size of the memory line (0: skip)")
    p.add_argument("--big-evals", type=int, default=5)
    p.add_argument("--no-peer", action="store_true", help="skip pastiche")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "benchmark")
    args = p.parse_args()

    from nst_lightning.hardware import resolve_precision
    from nst_lightning.judge import Judge

    compared = resolve_precision(args.precision, "cpu")
    also = ["32-true"] if args.also_precision is None else args.also_precision
    also = [p for p in dict.fromkeys(also) if resolve_precision(p, "cpu") != compared]
    print(f"nst-lightning: trainer.precision={args.precision} -> {compared}; also {also or 'nothing'}; "
          f"pastiche: 32-true (fp32 only)", flush=True)
    judge = Judge()
    settings = [arg for item in args.set for arg in ("--set", item)]
    rows: list[Row] = []
    for size in args.sizes:
        common = ["--content", str(args.content), "--style", str(args.style), "--size", str(size),
                  "--evals", str(args.evals), "--snapshot-every", str(args.snapshot_every)]
        out = args.workdir / f"ours_{size}"
        ours = run_worker("nst-lightning", "run_ours.py", [*common, "--output", str(out), "--set", f"trainer.precision={args.precision}", *settings], size, args.evals, out)
        judge_run(ours, judge, args.content, args.style)
        ran(ours)
        others = []
        for precision in also:
            out = args.workdir / f"ours_{size}_{precision}"
            other = run_worker(f"nst-lightning {precision}", "run_ours.py", [*common, "--output", str(out), "--set", f"trainer.precision={precision}", *settings], size, args.evals, out)
            judge_run(other, judge, args.content, args.style)
            ran(other)
            others.append(other)
        peer = None
        if not args.no_peer:
            out = args.workdir / f"pastiche_{size}"
            peer = run_worker("pastiche", "run_pastiche.py", [*common, "--output", str(out)], size, args.evals, out)
            judge_run(peer, judge, args.content, args.style)
            ran(peer)
        rows.append(Row(ours, peer, others))

    big = None
    if args.big:
        out = args.workdir / f"ours_{args.big}"
        big = run_worker("nst-lightning", "run_ours.py", ["--content", str(args.content), "--style", str(args.style),
                         "--size", str(args.big), "--evals", str(args.big_evals), "--output", str(out),
                         "--set", f"trainer.precision={args.precision}", *settings], args.big, args.big_evals, out)
        ran(big)
    report = render(rows, big, help_seconds(), args)
    args.results.write_text(report)
    print(report)


def ran(run: Run) -> None:
    """Say which precision a finished run used, with its speed, as the runs go."""
    print(f"{run.size} px {run.system}: precision {run.precision}, {run.s_per_eval:.3f} s/eval, "
          f"{run.wall_s:.1f} s whole process", flush=True)


def render(rows: list[Row], big: Run | None, help_s: float, args: argparse.Namespace) -> str:
    """The Markdown report."""
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine()}.",
        f"Pair: {args.content.name} x {args.style.name}; {args.evals} L-BFGS evaluations per run, one evaluation",
        "per step for both systems (nst-lightning `optim.max_iter=1`, pastiche's L-BFGS `max_iter=1`), so step",
        f"counts compare. nst-lightning: `trainer.precision={args.precision}` (ran as {rows[0].ours.precision if rows else '-'}), L-BFGS history 20 "
        f"({'preconditioned, the default' if not args.set else 'settings ' + ', '.join(args.set)}), default",
        "(relative) losses; pastiche 1.6: its defaults (history 100). Quality: nst_lightning.judge on the saved",
        "images (style = mean relative Gram distance relu1_1..relu5_1, style (sw) = relative sliced Wasserstein distance of "
        "the same layers, content = relative relu4_2 distance; lower is better).",
        "Rows naming a precision are nst-lightning again at that precision, to show which default is best here.",
        f"Command: `{' '.join(['python benchmarks/benchmark.py', *sys.argv[1:]])}`",
        "",
        "| size | system | precision | s/eval | optimisation s | process wall s | peak RSS MB | style | style (sw) | content |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ours, peer, others in rows:
        for r in (ours, *others, peer):
            if r is None:
                continue
            h, w = _shape(r.output / "final.png")
            lines.append(
                f"| {w}x{h} | {r.system} | {r.precision} | {r.s_per_eval:.3f} | {r.opt_s:.1f} | {r.wall_s:.1f} | {r.rss_mb:.0f} | "
                f"{r.quality[0]:.4f} | {r.quality[2]:.4f} | {r.quality[1]:.4f} |"
            )
        if peer is not None:
            lines.append(
                f"| | ratio pastiche / nst-lightning | | {peer.s_per_eval / ours.s_per_eval:.2f}x | "
                f"{peer.opt_s / ours.opt_s:.2f}x | {peer.wall_s / ours.wall_s:.2f}x | {peer.rss_mb / ours.rss_mb:.2f}x | | |"
            )
    from nst_lightning.hardware import resolve_precision

    lines += ["", "## Precision", ""]
    for ours, _, others in rows:
        for other in others:
            lines.append(
                f"- {ours.size} px: {ours.precision} {ours.s_per_eval:.3f} s/eval (style {ours.quality[0]:.4f}, content "
                f"{ours.quality[1]:.4f}) vs {other.precision} {other.s_per_eval:.3f} s/eval (style {other.quality[0]:.4f}, "
                f"content {other.quality[1]:.4f}): {other.s_per_eval / ours.s_per_eval:.2f}x."
            )
    lines.append(f"- The default `trainer.precision=auto` resolves to `{resolve_precision('auto', 'cpu')}` on this machine "
                 f"(`ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')}`, "
                 f"`ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}`); pastiche runs in fp32.")
    lines += ["", "## Time to pastiche's quality", ""]
    for ours, peer, _ in rows:
        if peer is None:
            continue
        hit = time_to_quality(ours, peer.quality)
        target = f"style <= {peer.quality[0]:.4f} and content <= {peer.quality[1]:.4f}"
        if hit is None:
            lines.append(f"- {ours.size} px: nst-lightning did not reach pastiche's {ours.evals}-evaluation quality ({target}).")
        else:
            step, secs = hit
            lines.append(
                f"- {ours.size} px: pastiche reaches its {peer.evals}-evaluation quality ({target}) in {peer.opt_s:.1f} s; "
                f"nst-lightning reaches it by evaluation {step} (first snapshot checked, every {args.snapshot_every}) in "
                f"{secs:.1f} s = {100 * secs / peer.opt_s:.0f}% of pastiche's time."
            )
    if big is not None:
        h, w = _shape(big.output / "final.png")
        lines += ["", "## Large output", "",
                  f"- {w}x{h}, {big.evals} evaluations: {big.s_per_eval:.2f} s/eval, peak RSS {big.rss_mb / 1024:.2f} GB "
                  f"(process wall {big.wall_s:.0f} s)."]
    lines += ["", "## Start-up", "", f"- `nst-lightning --help`: {help_s:.3f} s (best of 5)."]
    lines += ["", "## Targets (issue 9, CPU)", "", *targets(rows, big, help_s)]
    return "\n".join(lines) + "\n"


def targets(rows: list[Row], big: Run | None, help_s: float) -> list[str]:
    """Each CPU must-show line of the performance issue with the figure measured in this run: met or not."""

    def line(ok: bool, text: str) -> str:
        return f"- [{'x' if ok else ' '}] {text}"

    out = []
    for ours, peer, _ in rows:
        if peer is None or ours.size != 512:
            continue
        speed = peer.s_per_eval / ours.s_per_eval
        out.append(line(speed >= 2, f"512 px, same evaluations: {speed:.2f}x less time per evaluation than pastiche (target >= 2x)"))
        worse = max(ours.quality[0] / peer.quality[0], ours.quality[1] / peer.quality[1]) - 1
        out.append(line(worse <= 0.05, f"judged style and content no worse than pastiche's: {100 * worse:+.1f}% at worst (target <= +5%)"))
        hit = time_to_quality(ours, peer.quality)
        share = hit[1] / peer.opt_s if hit else float("inf")
        out.append(line(share <= 0.3, f"time to pastiche's {peer.evals}-evaluation quality: {100 * share:.0f}% of pastiche's time (target <= 30%)"))
        out.append(line(ours.rss_mb <= peer.rss_mb, f"peak RSS {ours.rss_mb:.0f} MB vs pastiche's {peer.rss_mb:.0f} MB (target: no higher)"))
    if big is not None:
        out.append(line(big.rss_mb <= 12 * 1024, f"{big.size} px run: peak RSS {big.rss_mb / 1024:.2f} GB (target <= 12 GB)"))
    out.append(line(help_s < 1, f"`nst-lightning --help` in {help_s:.3f} s (target < 1 s)"))
    return out


def _shape(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


if __name__ == "__main__":
    main()
