"""The shape the code promises: sans-io cores, no import cycles, no service
reaching into another package's private modules, modules that read in one
sitting. Read from the source (ast), nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {
    "orchestrator_service": REPO / "orchestrator_service",
    "worker_service": REPO / "worker_service",
    "squire_kernel": REPO / "squire_kernel",
    "squire": REPO / "clients" / "python" / "squire",
}
# The orchestrator's routing core: pure state machines, no I/O.
ORCHESTRATOR_CORE = [
    "_admission", "_channel", "_core", "_directive", "_dispatch", "_events", "_fold",
    "_items", "_journal_types", "_model", "_outcomes", "_state", "_validate",
]
IO_MODULES = {"grpc", "asyncio", "socket", "time", "threading", "selectors"}
MAX_LINES = 460


def modules(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    out = {}
    for path in root.rglob("*.py"):
        if "api" in path.relative_to(root).parts:  # generated code
            continue
        rel = path.relative_to(root).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path, name: str) -> set[str]:
    """Modules imported at run time (``if TYPE_CHECKING:`` blocks excluded)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return found


def graph(package: str) -> dict[str, set[str]]:
    mods = modules(package)
    # Importing a submodule imports its package first anyway: an edge to the
    # package itself (``from pkg import _mod``) is not a dependency.
    return {
        name: {m for m in imports(path, name) if m in mods and m not in (name, package)}
        for name, path in mods.items()
    }


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(package: str) -> None:
    edges = graph(package)
    # the package's __init__ re-exports its modules; a module importing its
    # own package's __init__ would close a cycle, which the search finds.
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


@pytest.mark.parametrize("name", ORCHESTRATOR_CORE)
def test_the_routing_core_does_no_io(name: str) -> None:
    path = PACKAGES["orchestrator_service"] / f"{name}.py"
    used = {m.split(".")[0] for m in imports(path, f"orchestrator_service.{name}")}
    assert not used & IO_MODULES, f"{name} imports {sorted(used & IO_MODULES)}"
    services = {m for m in imports(path, name) if m.startswith("orchestrator_service.")}
    impure = {"_servicer", "_session", "_hub", "_server", "_metrics", "_interceptor",
              "_security", "_convert", "__main__", "_sqlite_store", "_sqlite_file",
              "_memory_store"}
    assert not {m.rsplit(".", 1)[-1] for m in services} & impure, services


@pytest.mark.parametrize("package", ["orchestrator_service", "worker_service", "squire"])
def test_no_package_imports_another_packages_private_modules(package: str) -> None:
    for name, path in modules(package).items():
        for imported in imports(path, name):
            top, _, rest = imported.partition(".")
            if top == package or top not in PACKAGES or (top == "squire" and rest == "api.v1"):
                continue
            private = [p for p in rest.split(".") if p.startswith("_") and not p.endswith("__")]
            assert not private, f"{name} imports {imported}"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_module_reads_in_one_sitting(package: str) -> None:
    long = {
        name: n for name, path in modules(package).items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
