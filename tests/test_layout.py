"""The package's import graph points one way: cli -> api -> runs -> session -> module -> core -> images -> config.

Read from the source with ``ast`` (no import runs): every ``from .x import`` of every module, at module level or
inside a function, except under ``if TYPE_CHECKING``. The package's ``__init__`` (lazy names for users) is left out.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nst_lightning"
LONG_FILE = 450
"""Lines from which a module is reported as doing more than one job."""

LAYERS = [
    ("ground", {"errors", "allocator", "kinds", "layers", "atomic"}),
    ("config", {"sections", "config"}),
    ("images", {"images"}),
    ("core", {"features", "objective", "gram", "wasserstein", "smoothness", "losses", "tiling", "optim", "cudagraph", "color", "flow", "judge", "hardware", "free_memory", "memory", "onnx_graph"}),
    ("pieces", {"problem", "checkpointing", "targets", "guards", "resources", "pairs", "data", "videoio", "lock", "quiet", "history", "plots", "callbacks", "faults", "image_logging", "groups"}),
    ("module", {"module"}),
    ("session", {"session", "rundir", "inputs", "export", "folder", "video"}),
    ("runs", {"runs", "sweep"}),
    ("api", {"api"}),
    ("cli", {"cli", "lightning_cli", "__main__"}),
]
"""Bottom to top; a module may import from its own layer (without a circle) and the layers below."""


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST) -> set[str]:
    """The package modules a module imports (relative imports), skipping ``if TYPE_CHECKING`` blocks."""
    out: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            out.update(n for n in names if (PACKAGE / f"{n}.py").is_file())
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_graph() -> dict[str, set[str]]:
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    return {m: _imports(ast.parse((PACKAGE / f"{m}.py").read_text(encoding="utf-8"))) - {m, "__init__"} for m in modules}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path of module names, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_every_module_has_a_layer():
    placed = {m for _, members in LAYERS for m in members}
    assert set(import_graph()) - placed == set(), "place each new module in LAYERS"
    assert placed - set(import_graph()) == set(), "LAYERS names a module that no longer exists"


def test_imports_form_no_circle():
    assert _cycle(import_graph()) is None


def test_no_import_points_back_up_the_layers():
    level = {m: i for i, (_, members) in enumerate(LAYERS) for m in members}
    upward = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps if level[d] > level[m]]
    assert upward == []


def test_a_circle_and_an_upward_arrow_are_seen():
    assert _cycle({"api": {"batch"}, "batch": {"api"}}) == ["api", "batch", "api"]
    tree = ast.parse("if TYPE_CHECKING:\n    from .runs import x\ndef f():\n    from .session import y\n")
    assert _imports(tree) == {"session"}


def test_long_modules_are_reported():
    long = {p.name: n for p in sorted(PACKAGE.glob("*.py")) if (n := len(p.read_text(encoding="utf-8").splitlines())) > LONG_FILE}
    report = ", ".join(f"{name} {n} lines" for name, n in long.items()) or "none"
    print(f"modules over {LONG_FILE} lines: {report}")
    if long:
        warnings.warn(f"modules over {LONG_FILE} lines: {report}", stacklevel=1)
