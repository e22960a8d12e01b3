"""The layout's rules, read from the source: import direction, no import loops, module size.

Imports are read with `ast`, all of them (also those inside functions), except the ones
under `if TYPE_CHECKING:`, which only name types.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "proxy"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports_of(name: str) -> set[str]:
    """The proxy modules `name` imports at run time."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
            continue
        base = here[: len(here) - (node.level - 1)] if node.level else []
        target = ".".join([*base, *(node.module.split(".") if node.module else [])])
        if target not in MODULES:
            continue
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            # A submodule, or a name from the package's __init__ (its own package's too:
            # that __init__ may still be loading).
            out.add(sub if sub in MODULES else target)
    out.discard(name)
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read() -> None:
    # A reader that finds nothing would pass every rule below.
    assert "proxy.authorize" in GRAPH["proxy.gate"]
    assert "proxy.identity.session" in GRAPH["proxy.identity.caller"]
    assert "proxy.state" in GRAPH["proxy.web.refusal"]
    assert "proxy.live" not in GRAPH["proxy.state"]  # a TYPE_CHECKING import


def test_no_import_loops() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            strongconnect(v)
    assert loops == []


def test_the_gate_renders_no_pages() -> None:
    assert not [m for m in GRAPH["proxy.gate"] if _under(m, "proxy.web")]


@pytest.mark.parametrize("name", [n for n in MODULES if _under(n, "proxy.web")])
def test_pages_stay_off_the_byte_path(name: str) -> None:
    assert not [m for m in GRAPH[name] if _under(m, "proxy.forward", "proxy.gate", "proxy.live")]


SERVICES = {
    "identity": ("proxy.identity",),
    "policy": (
        "proxy.policy",
        "proxy.policyfile",
        "proxy.presets",
        "proxy.queryrules",
        "proxy.bodyrules",
        "proxy.listspec",
        "proxy.sensitivity",
        "proxy.refspec",
        "proxy.blobspec",
    ),
    "grants": ("proxy.grants", "proxy.grantstore", "proxy.grantview", "proxy.breaker"),
    "audit": ("proxy.audit",),
}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_services_do_not_import_each_other(service: str) -> None:
    others = [p for s, prefixes in SERVICES.items() if s != service for p in prefixes]
    mine = [n for n in MODULES if _under(n, *SERVICES[service])]
    assert mine
    crossing = {n: sorted(m for m in GRAPH[n] if _under(m, *others)) for n in mine}
    assert {n: m for n, m in crossing.items() if m} == {}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_600_lines(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)}: {lines} lines"


def test_no_service_imports_the_metadata_package() -> None:
    # Recording metadata is wired in by app.py; the services never ask the tool themselves.
    services = [n for n in MODULES for p in SERVICES.values() if _under(n, *p)]
    assert [n for n in services if any(_under(m, "proxy.metadata") for m in GRAPH[n])] == []
    assert "proxy.metadata" in GRAPH["proxy.app"]
