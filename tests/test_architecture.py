"""The package's shape, checked: the library never imports the lab (or the benchmarks or the CLI),
no import cycles, ``import bnlab`` loads no downloader, and the definition is self-contained."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import bnlab

SRC = Path(bnlab.__file__).resolve().parent
TOOLS = ("bnlab.lab", "bnlab.bench", "bnlab.cli", "bnlab.__main__")      # built on the library


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """bnlab modules ``path`` imports (module-level or in functions; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    skip: set[int] = set()
    for node in ast.walk(tree):                   # `if TYPE_CHECKING:` blocks import nothing at run time
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bnlab")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("bnlab"):
                continue
            found.add(target)
            for alias in node.names:                      # `from . import kernels`: a module
                candidate = f"{target}.{alias.name}"
                if (SRC.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                        (SRC.parent / Path(*candidate.split(".")) / "__init__.py").exists():
                    found.add(candidate)
    return found - {here}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def _is_tool(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TOOLS)


def test_the_library_never_imports_the_lab_the_benchmarks_or_the_cli():
    offenders = {m: sorted(i for i in imports if _is_tool(i))
                 for m, imports in _graph().items() if not _is_tool(m)}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_import_cycles():
    graph = _graph()
    # a package imports its submodules for its namespace; a submodule importing a sibling through
    # the package is an edge to the sibling, not a cycle through the package
    edges = {m: {i for i in imports if i in graph and not m.startswith(i + ".")} for m, imports in graph.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_definition_imports_nothing_of_bnlab():
    assert _imports(SRC / "definition.py") == set()


def test_importing_bnlab_loads_neither_the_lab_nor_plotting():
    code = ("import sys, bnlab; bad = [m for m in ('bnlab.lab', 'bnlab.lab.data', 'bnlab.bench', "
            "'matplotlib') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_library_module_downloads():
    """urllib/tarfile belong to the lab's MNIST downloader only (torch itself imports them)."""
    for path in SRC.rglob("*.py"):
        if not _is_tool(_module_name(path)):
            text = path.read_text()
            assert "urllib" not in text and "tarfile" not in text, path
