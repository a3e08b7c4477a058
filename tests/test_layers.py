"""The layers point one way (STYLE.md practice 1) and only raft/ touches PySyncObj (practice 3).

storage/ imports nothing of ours, raft/ may import storage/, node/ may import both. PySyncObj runs its own
thread, and the only way back into trio is the bridge in raft/; so node/ may use raft.bridge and
raft.machine types but never imports `pysyncobj` itself, and storage/ (below raft/) never does either.

Inside node/ (DESIGN.md, "Layout"): wire/ imports nothing of ours; the client library never reaches the
server side (server, pools, cluster, api, plugins, tools), directly or through another module; nothing the
server reaches imports tools/; and no module, nor any of node/'s parts, imports itself in a circle.

Every import counts: module level, inside functions, under `if TYPE_CHECKING:`, relative, and the
string-named ones (`importlib.import_module("x")`, `__import__("x")`), since each couples the layers.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OUR_PACKAGES = ("storage", "raft", "node")

# Which of our packages each layer may not import: everything above it.
FORBIDDEN_OURS = {"storage": {"raft", "node"}, "raft": {"node"}, "node": set()}
# Third-party packages a layer may not import: the Raft library belongs to raft/ alone.
FORBIDDEN_THIRD_PARTY = {"storage": {"pysyncobj"}, "raft": set(), "node": {"pysyncobj"}}


@dataclass(frozen=True)
class Import:
    file: str
    line: int
    module: str  # absolute dotted name

    @property
    def top(self) -> str:
        return self.module.split(".", 1)[0]

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.module}"


def _package_of(path: Path, root: Path) -> list[str]:
    """The dotted package a file's relative imports start from."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1]  # the module itself is dropped; for __init__ that leaves the package


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every module `path` imports, resolved to an absolute dotted name."""
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path, root)
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if node.module is None:
                # `from . import keys`: each name is a module of the package.
                found += [Import(rel, node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append(Import(rel, node.lineno, module))
        elif (
            isinstance(node, ast.Call)
            and _is_dynamic_import(node.func)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(rel, node.lineno, node.args[0].value))
    return found


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in {"__import__", "import_module"}
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def violations(layer: str, root: Path = REPO) -> list[Import]:
    forbidden = FORBIDDEN_OURS[layer] | FORBIDDEN_THIRD_PARTY[layer]
    bad: list[Import] = []
    for path in sorted((root / layer).rglob("*.py")):
        bad += [imp for imp in imports_of(path, root) if imp.top in forbidden]
    return bad


def _modules(layer: str) -> list[Path]:
    return sorted((REPO / layer).rglob("*.py"))


# -- the rules on the real tree -------------------------------------------------------------------------
@pytest.mark.parametrize("layer", OUR_PACKAGES)
def test_layer_imports_point_down(layer: str) -> None:
    assert _modules(layer), f"no modules under {layer}/: the walk would prove nothing"
    bad = violations(layer)
    allowed_ours = set(OUR_PACKAGES) - FORBIDDEN_OURS[layer]
    assert not bad, (
        f"{layer}/ may import only {sorted(allowed_ours)} of ours and never "
        f"{sorted(FORBIDDEN_THIRD_PARTY[layer]) or 'nothing else'}:\n" + "\n".join(map(str, bad))
    )


def test_only_raft_imports_pysyncobj() -> None:
    users = sorted(
        {
            imp.file
            for layer in OUR_PACKAGES
            for path in _modules(layer)
            for imp in imports_of(path, REPO)
            if imp.top == "pysyncobj"
        }
    )
    assert users, "nothing imports pysyncobj: the rule below would hold vacuously"
    assert all(file.startswith("raft/") for file in users), f"pysyncobj outside raft/: {users}"


def test_node_reaches_raft_only_through_its_public_modules() -> None:
    """node/ does use raft/ (bridge, machine, …): the walk must see those imports, or it sees nothing."""
    raft_users = {
        imp.module for path in _modules("node") for imp in imports_of(path, REPO) if imp.top == "raft"
    }
    assert {"raft.bridge", "raft.machine"} <= raft_users, raft_users


# -- inside node/ ----------------------------------------------------------------------------------------
def module_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Each of our modules (dotted name) and the modules of ours it imports."""
    files: dict[str, Path] = {}
    for layer in OUR_PACKAGES:
        for path in sorted((root / layer).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def ours(module: str) -> str | None:
        # `from node.api import users` names a module; `from node.api.app import F` names its module.
        while module and module not in files:
            module = module.rpartition(".")[0]
        return module or None

    return {
        name: {found for imp in imports_of(path, root) if (found := ours(imp.module)) and found != name}
        for name, path in files.items()
    }


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def part_of(module: str) -> str:
    """node's part a module belongs to: node.pools.user -> node.pools; raft.apply -> raft."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "node" and len(parts) > 1 else parts[0]


GRAPH = module_graph()
CLIENT_NEVER = ("node.server", "node.pools", "node.cluster", "node.api", "node.plugins", "node.tools")


def _under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_wire_imports_nothing_of_ours() -> None:
    wire = [m for m in GRAPH if _under(m, ("node.wire",))]
    assert wire, "no modules under node/wire"
    bad = {m: sorted(d for d in GRAPH[m] if not _under(d, ("node.wire",))) for m in wire}
    assert not any(bad.values()), bad


def test_the_client_never_reaches_the_server_side() -> None:
    reached = reach(GRAPH, "node.client")
    assert "node.gateway.transports" in reached, "the client shares the gateway's transports"
    assert not [m for m in reached if _under(m, CLIENT_NEVER)], sorted(reached)


def test_the_server_never_reaches_tools() -> None:
    reached = reach(GRAPH, "node.server")
    assert "node.api.app" in reached  # the walk sees the server's parts, or it proves nothing
    assert not [m for m in reached if _under(m, ("node.tools",))], sorted(reached)


def test_no_module_imports_itself_in_a_circle() -> None:
    assert not circles(GRAPH)


def test_node_parts_import_each_other_one_way() -> None:
    parts: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        parts.setdefault(part_of(module), set()).update(
            part_of(d) for d in deps if part_of(d) != part_of(module)
        )
    assert {"node.wire", "node.gateway", "node.pools", "node.cluster", "node.api", "node.client"} <= set(
        parts
    )
    assert not circles(parts)


def test_the_circle_finder_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


# -- the checker itself catches every shape of import ------------------------------------------------------
def test_the_walker_catches_every_import_shape(tmp_path: Path) -> None:
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "__init__.py").write_text("from . import keys\n")
    (tmp_path / "storage" / "keys.py").write_text("import struct\n")
    (tmp_path / "storage" / "bad.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import raft.apply\n"  # 3
        "from ..node import server\n"  # 4: relative, two levels up
        "if TYPE_CHECKING:\n"
        "    from node.gateway.connection import Connection\n"  # 6
        "def later():\n"
        "    import importlib\n"
        "    importlib.import_module('pysyncobj')\n"  # 9
        "    return __import__('node.gateway')\n"  # 10
        "from .keys import part\n"  # ours, allowed
    )
    bad = violations("storage", root=tmp_path)
    assert sorted((imp.line, imp.module) for imp in bad) == [
        (3, "raft.apply"),
        (4, "node"),
        (6, "node.gateway.connection"),
        (9, "pysyncobj"),
        (10, "node.gateway"),
    ]
    init_imports = imports_of(tmp_path / "storage" / "__init__.py", tmp_path)
    assert [imp.module for imp in init_imports] == ["storage.keys"]
