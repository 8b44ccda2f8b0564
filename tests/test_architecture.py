"""The package's import structure: the import-linter contracts in pyproject.toml hold (layers that
point one way, no step module importing another, no cycles, mlflow only behind tracking), and
no module of mlproject takes part in an import circle — imports inside functions included.

    lint-imports --no-cache        # the same contracts, from the repository root
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

if os.environ.get("CI"):  # CI installs the dev extra: a missing import-linter is a red run, not a skip
    import grimp
else:
    grimp = pytest.importorskip("grimp", reason="import-linter (and grimp) come with the dev extra: "
                                "pip install -e '.[dev]'")


def _graph(package: str, path: Path):
    """grimp's graph of ``package`` as found under ``path`` (no cache written into the repository)."""
    sys.path.insert(0, str(path))
    try:
        return grimp.build_graph(package, cache_dir=None)
    finally:
        sys.path.remove(str(path))


def _circles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph.modules):
        if v not in index:
            visit(v)
    return out


def test_the_import_contracts_hold():
    """`lint-imports` on the repository's own source: every contract in pyproject.toml is kept."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" in proc.stdout and " 0 broken" in proc.stdout, proc.stdout


def test_no_module_is_in_an_import_circle():
    """Module by module (a circle names its modules, unlike the package-level contract's summary)."""
    graph = _graph("mlproject", SRC)
    assert "mlproject.steps.shared.runs" in graph.modules  # the graph is of this source tree
    assert _circles(graph) == []


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The contracts rest on this: a lazy import (inside a function) is an edge of grimp's graph,
    so a circle closed by one is caught."""
    pkg = tmp_path / "lazyprobe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lazyprobe import b\n")
    (pkg / "b.py").write_text(textwrap.dedent("""\
        def later():
            from lazyprobe import a  # closes the circle a -> b -> a
            return a
    """))
    graph = _graph("lazyprobe", tmp_path)
    assert graph.direct_import_exists(importer="lazyprobe.b", imported="lazyprobe.a")
    assert _circles(graph) == [["lazyprobe.a", "lazyprobe.b"]]
