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
# module-level tables allowed, each with why it cannot be an object passed in
MODULE_TABLES = {
    "pxd.metrics.METRICS": "the metric registry, filled by `register` calls",
    "orchestrator.tracking.credentials._full_urls": "passwords to mask in any text this process writes or prints",
    "orchestrator.tracking.credentials._passwords": "passwords to mask in any text this process writes or prints",
    "orchestrator.stages.leases._engines": "one pooled SQL engine per database per process (connection pooling)",
    "orchestrator.tracking.server._LAUNCH_URI": "the running launch's server, for what Tune unpickles (no arguments)",
    "orchestrator.driver.progress._LAUNCH": "the running launch's progress, for what Tune unpickles (no arguments)",
}


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
    """Modules of this repo imported anywhere in `path`: module level, inside functions and under
    `TYPE_CHECKING` alike (a type-only import is still an edge of the design)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _modules() -> dict[str, Path]:
    modules = {}
    for package in ("pxd", "orchestrator"):
        for path in (ROOT / package).rglob("*.py"):
            modules[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return modules


def _edges(path: Path, modules: dict[str, Path]) -> set[str]:
    """The repo's modules `path` imports: `from a.b import c` is an edge to `a.b.c` when that is a module
    (a sub-module, not the package `a.b`), else to `a.b`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    """module → the repo's modules it imports, anywhere in the file."""
    modules = _modules()
    return {name: _edges(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_import_cycles_counting_function_level_and_type_checking_imports():
    cycle = _cycle(_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_sees_imports_inside_functions_and_under_type_checking():
    """The check itself: a cycle closed only by a function-level import, or only under TYPE_CHECKING, is found."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pxd.config import X\ndef f():\n    import pxd.train\n"
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    assert {"pxd.config", "pxd.train"} <= found


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "orchestrator" and len(parts) > 2 else None


def test_the_orchestrators_rooms_import_one_way():
    """A room imports only from rooms before it in `orchestrator.ROOMS` (and from pxd)."""
    from orchestrator import ROOMS

    rooms_on_disk = {p.name for p in (ROOT / "orchestrator").iterdir() if (p / "__init__.py").is_file()}
    assert rooms_on_disk == set(ROOMS), f"orchestrator.ROOMS {ROOMS} differs from the sub-packages {sorted(rooms_on_disk)}"
    order = {room: index for index, room in enumerate(ROOMS)}
    wrong = []
    for module, imported in _graph().items():
        room = _room(module)
        for target in imported:
            other = _room(target)
            if room and other and order[other] > order[room]:
                wrong.append(f"{module} ({room}) imports {target} ({other})")
    assert not wrong, "imports against the rooms' order:\n" + "\n".join(sorted(wrong))


def test_at_most_three_loose_modules_at_the_top_of_the_orchestrator():
    loose = [p.name for p in (ROOT / "orchestrator").glob("*.py") if p.name != "__init__.py"]
    assert len(loose) <= 3, f"loose modules at the top of orchestrator/: {loose}"


def _sizes() -> tuple[list[str], list[str]]:
    long_files, long_functions = [], []
    for path in _modules().values():
        text = path.read_text()
        where = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{where}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{where}:{node.lineno} {node.name}: {lines} lines")
    return long_files, long_functions


MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def test_no_file_over_400_lines_and_no_function_over_80():
    long_files, long_functions = _sizes()
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)


def test_no_module_global_state():
    """What a process keeps lives in an object passed in (`orchestrator.worker.kept.WorkerState`,
    `pxd.memo.ProcessMemory`): no `global` statement, and no module-level table that starts empty unless
    `MODULE_TABLES` says why it cannot be an object passed in."""
    registries = MODULE_TABLES
    found = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                found.append(f"{name}:{node.lineno} global {', '.join(node.names)}")
        for node in tree.body:
            target, value = None, None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign):
                target, value = node.target, node.value
            empty = (isinstance(value, (ast.Dict, ast.List, ast.Set)) and not getattr(value, "keys", getattr(value, "elts", None))
                     or isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) in
                     ("dict", "list", "set", "OrderedDict", "defaultdict"))
            if empty and isinstance(target, ast.Name) and f"{name}.{target.id}" not in registries:
                found.append(f"{name}:{node.lineno} {target.id} (a module-level table)")
    assert not found, "module-global state:\n" + "\n".join(found)


def _function_imports_without_a_reason(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    missing = []
    for top in tree.body:
        if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(top):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.module == "__future__" if isinstance(node, ast.ImportFrom) else False:
                continue
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            # the reason: a comment on the statement's lines, or above the block of imports it belongs to
            if any("#" in lines[i] for i in range(node.lineno - 1, node.end_lineno)):
                continue
            above = node.lineno - 2
            while above >= 0 and (lines[above].strip() == "" or lines[above].lstrip().startswith(("import ", "from "))
                                  or lines[above].strip().endswith((",", "(")) or lines[above].strip() == ")"):
                if "#" in lines[above]:
                    break
                above -= 1
            if above >= 0 and lines[above].lstrip().startswith("#"):
                continue
            if above >= 0 and "#" in lines[above] and lines[above].lstrip().startswith(("import ", "from ")):
                continue
            missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {lines[node.lineno - 1].strip()}")
    return missing


def test_every_import_inside_a_function_says_why():
    """Imports sit at the top; one inside a function only where start-up cost needs it, with a comment saying so."""
    missing = [line for path in _modules().values() for line in _function_imports_without_a_reason(path)]
    assert not missing, f"{len(missing)} function-level imports without a reason:\n" + "\n".join(missing)


def test_the_library_never_imports_ray_optuna_mlflow_or_the_orchestrator():
    for path in (ROOT / "pxd").rglob("*.py"):
        imported = _imports(path)
        bad = {m for m in imported if m.split(".")[0] in ("ray", "optuna", "mlflow", "orchestrator")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
