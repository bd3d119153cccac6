"""docs/architecture.md matches the code, the library never imports the orchestrator's stack, and
neither package has an import cycle (module-level or function-level imports alike)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def _documented() -> list[tuple[str, list[str]]]:
    """(module file, [names in backticks on its row]) for every table row naming a module file."""
    rows = []
    for line in DOC.read_text().splitlines():
        match = re.match(r"\|\s*`((?:pxd|orchestrator)/[\w/]+\.py)`\s*\|(.*)\|\s*$", line)
        if match:
            names = re.findall(r"`([A-Za-z_][\w.]*)`", match.group(2))
            rows.append((match.group(1), names))
    return rows


def test_the_doc_names_every_module_of_both_packages():
    documented = {path for path, _ in _documented()}
    on_disk = {str(p.relative_to(ROOT)) for package in ("pxd", "orchestrator") for p in (ROOT / package).rglob("*.py")
               if p.name != "__init__.py" or p.parent.name == "data"}
    on_disk -= {f"pxd/losses/{p.name}" for p in (ROOT / "pxd" / "losses").glob("*.py")}  # one row: pxd/losses/
    on_disk.discard("pxd/types.py")  # shown as the shared data types
    assert on_disk <= documented, f"modules missing from docs/architecture.md: {sorted(on_disk - documented)}"


@pytest.mark.parametrize(("path", "names"), _documented(), ids=[p for p, _ in _documented()])
def test_every_module_and_name_the_doc_gives_exists(path, names):
    assert (ROOT / path).is_file(), f"{path} is named in docs/architecture.md but does not exist"
    module = importlib.import_module(path.removesuffix(".py").removesuffix("/__init__").replace("/", "."))
    for name in names:
        head = name.split(".")[0]
        if "/" in name or head in ("pxd", "orchestrator") or not head[0].isalpha():
            continue
        assert hasattr(module, head), f"docs/architecture.md names {name} in {path}, which has no {head}"


def _imports(path: Path) -> set[str]:
    """Modules of this repo imported anywhere in `path` (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {}
    for package in ("pxd", "orchestrator"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        type_only = set()
        for node in ast.walk(tree):  # imports under `if TYPE_CHECKING:` never run
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and inner.module:
                        type_only.add(inner.module)
        graph[name] = {m for m in _imports(path) if m in modules and m != name} - type_only
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_library_never_imports_ray_optuna_mlflow_or_the_orchestrator():
    for path in (ROOT / "pxd").rglob("*.py"):
        imported = _imports(path)
        bad = {m for m in imported if m.split(".")[0] in ("ray", "optuna", "mlflow", "orchestrator")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
