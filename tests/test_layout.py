"""The package's import graph (every import, also those inside functions): no cycle, and no module imports a
higher layer (docs/ARCHITECTURE.md lists the layers)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lorablend"
LAYERS = [  # lowest first; a package name covers its modules
    ("errors", "atomic", "stats", "machine", "cluster", "lorablend"),
    ("dataset", "sketch", "distances", "coefficients", "combine", "adapter", "bank", "runtime", "output"),
    ("settings",),
    ("generate", "validate", "budget"),
    ("bench", "demo"),
    ("cli", "__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the lorablend modules it imports (a `from pkg import name` names module pkg.name when it is one)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    return next(i for i, names in enumerate(LAYERS) if top in names)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "lorablend.runtime.models" in graph["lorablend.generate"]  # imported inside a function
    assert len(graph) > 40


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer_and_imports_none_above_it():
    graph = import_graph()
    upward = [(m, d) for m, deps in graph.items() for d in deps if layer(d) > layer(m)]
    assert upward == []


@pytest.mark.parametrize("module", ["lorablend.settings", "lorablend.generate", "lorablend.validate"])
def test_the_pipeline_and_settings_do_not_reach_into_the_bench(module):
    assert not any(d.startswith("lorablend.bench") for d in import_graph()[module])


def test_the_command_line_starts_without_torch_or_pot():
    """Every command, even --help and a one-line error, imports lorablend.cli: torch and POT (which loads torch)
    are seconds of start-up, imported only where a command needs them."""
    import subprocess
    import sys

    probe = "import sys, lorablend.cli; print(sorted(m for m in ('torch', 'ot') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
