"""The library's shape: no import circles, no upward arrows, cheap config imports.

The import graph is read from the source (every ``import`` statement, function-level and
``TYPE_CHECKING`` ones included), so a circle is caught even where Python would resolve it
lazily at run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "claver_dist"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import submodule`` resolved)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # a name inside a module: the module
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_reader_sees_imports_and_circles():
    graph = import_graph()
    assert "claver_dist.data.plan" in graph["claver_dist.data.cpu"]
    assert "claver_dist.checkpoint" in graph["claver_dist.eval.load"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_no_upward_arrows():
    """eval/ scores trained models without the training package; the library's leaves stay leaves."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("claver_dist.eval"):
            assert not [d for d in deps if d.startswith("claver_dist.train")], mod
        if mod.startswith(("claver_dist.model", "claver_dist.data", "claver_dist.text")):
            assert not [d for d in deps if d.startswith(("claver_dist.train", "claver_dist.eval"))], mod
    assert graph["claver_dist.errors"] == set()
    assert not [d for d in graph["claver_dist.checkpoint"] if d.startswith("claver_dist.train")]


def test_config_and_launcher_imports_stay_light():
    """``import claver_dist.config`` and a SLURM dry run never load torch, open_clip or DeepSpeed
    (seconds each on a cold start: every ``--help`` would pay for them)."""
    code = ("import io, sys, contextlib; import claver_dist.config; from launch.slurm import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out: rc = main(['--nodes', '8', '--dry-run', "
            "'configs/k400_l14.yaml'])\n"
            "assert rc == 0 and '#SBATCH --nodes=8' in out.getvalue()\n"
            "print(sorted(m for m in ('torch', 'open_clip', 'deepspeed', 'timm') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
