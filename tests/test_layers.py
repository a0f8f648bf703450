"""The package's layers, read from its import graph: imports only go down, and nothing goes round.

``LAYERS`` is the one statement of the order (the README draws the same): a module may import
modules of its own layer or of any layer below it. Every import counts, including those under
``TYPE_CHECKING`` and inside functions, because each is a dependency a reader must hold in mind.
``client/`` stands beside the server: it may use the protocol only, and no server code imports it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "haip_runtime"

#: Lowest first. Each entry is one layer: the packages and modules it is made of.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("protocol", "exceptions"),
    ("config", "observability"),
    ("transports", "store", "bridge", "cluster"),
    ("auth",),
    ("session",),
    ("tools",),
    ("llm", "speech"),
    ("agents", ""),  # "" is the package's own __init__: the plugin authors' surface
    ("conversation",),
    ("hub",),
    ("server", "testing"),
    ("starter", "preflight"),  # init and the embedded defaults; check's look beyond the file
    ("cli", "__main__", "demo"),  # demo: the default haip.toml's agents and MCP servers (run, never imported)
)
#: The only imports between different rooms of one layer (rooms of a layer are otherwise strangers:
#: a transport never reaches into the store or the bridge, the server never into the test harness).
SIDEWAYS = {
    ("protocol", "exceptions"),  # the codec raises DecodeError...
    ("exceptions", "protocol"),  # ...whose codes are the protocol's (no module circle: see cycles)
    ("observability", "config"),  # logging is set up from [observability]
    ("", "agents"),  # the package's surface re-exports the plugin API
    ("__main__", "cli"),
}
#: Beside the server, not above it: what ``client/`` may import.
CLIENT_MAY_USE = ("protocol", "exceptions", "client")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str:
    """The first name below ``haip_runtime`` (``haip_runtime.session.window`` -> ``session``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(module: str) -> int:
    name = room(module)
    for index, members in enumerate(LAYERS):
        if name in members:
            return index
    raise AssertionError(f"{module}: its room {name!r} is in no layer of LAYERS")


def imports(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """Every haip_runtime module ``path`` imports, with the line, as absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "haip_runtime":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "haip_runtime":
                continue
            for alias in node.names:
                # `from haip_runtime.server import playground` imports a submodule, not a name.
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in GRAPH_MODULES else base), node.lineno


GRAPH_MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, dict[str, int]]:
    graph: dict[str, dict[str, int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        edges = graph.setdefault(module, {})
        for target, line in imports(path, module):
            if target != module and target in GRAPH_MODULES:
                edges.setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    wrong = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            if room(module) == "client":
                if room(target) not in CLIENT_MAY_USE:
                    wrong.append(f"{module}:{line} imports {target}: the client uses the protocol only")
            elif room(target) == "client":
                if layer(module) < layer("haip_runtime.cli"):
                    wrong.append(f"{module}:{line} imports {target}: server code never imports the client")
            elif layer(target) > layer(module):
                wrong.append(f"{module}:{line} imports {target}, a higher layer")
            elif layer(target) == layer(module) and room(target) != room(module):
                if (room(module), room(target)) not in SIDEWAYS:
                    wrong.append(f"{module}:{line} imports {target}, another room of its layer")
    return wrong


GRAPH = import_graph()


def test_every_module_has_a_layer() -> None:
    for module in GRAPH:
        if room(module) != "client":
            layer(module)


def test_imports_go_round_nowhere() -> None:
    assert cycles(GRAPH) == []


def test_imports_only_go_down() -> None:
    assert upward_imports(GRAPH) == []


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("haip_runtime.auth.tokens", "haip_runtime.session.session"),
        ("haip_runtime.llm.provider", "haip_runtime.agents.api"),
        ("haip_runtime.tools.proxy", "haip_runtime.agents.api"),
        ("haip_runtime.observability.metrics", "haip_runtime.server.app"),
        ("haip_runtime.transports.sse", "haip_runtime.server.app"),
        ("haip_runtime.transports.base", "haip_runtime.session.session"),
        ("haip_runtime.session.connection", "haip_runtime.hub.router"),
        ("haip_runtime.server.app", "haip_runtime.client.chat"),
        ("haip_runtime.transports.websocket", "haip_runtime.bridge.mcp_bridge"),
        ("haip_runtime.transports.sse", "haip_runtime.store.sqlite"),
        ("haip_runtime.server.app", "haip_runtime.testing.harness"),
        ("haip_runtime.config.models", "haip_runtime.observability.metrics"),
    ],
)
def test_the_check_finds_each_arrow_the_layout_removed(module: str, target: str) -> None:
    """The arrows the layout issue named, put back one at a time, are each caught."""
    graph = {name: dict(edges) for name, edges in GRAPH.items()}
    graph[module][target] = 1
    assert any(f"{module}:1 imports {target}" in line for line in upward_imports(graph))


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("haip_runtime.hub.audio", "haip_runtime.hub.router"),  # audio was a hub handler outside the hub
        ("haip_runtime.session.flow", "haip_runtime.session.session"),
        ("haip_runtime.conversation.runs", "haip_runtime.conversation.transaction"),
    ],
)
def test_the_check_finds_a_circle_within_one_layer(module: str, target: str) -> None:
    graph = {name: dict(edges) for name, edges in GRAPH.items()}
    graph[module][target] = 1
    assert any({module, target} <= set(circle) for circle in cycles(graph))


def test_the_readme_draws_the_same_layers() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    drawing = readme[readme.index("## Layout") :].split("```")[1]
    drawn: list[tuple[str, ...]] = []
    for line in drawing.splitlines():
        number, _, rest = line.strip().partition(" ")
        if number.isdecimal():
            names = [word for word in rest.split() if word.endswith(("/", ".py")) or word == "__init__"]
            drawn.append(tuple("" if n == "__init__" else n.removesuffix("/").removesuffix(".py") for n in names))
    expected = [tuple(name for name in layer if name != "__main__") for layer in LAYERS]
    assert drawn[::-1] == expected


def noun(name: str) -> str:
    return name.removesuffix("s")


def test_no_two_modules_are_named_for_the_same_noun() -> None:
    """``session.py`` beside ``sessions.py``, or ``hub/tools.py`` beside ``tools/``, make a reader guess.

    A folder's parts may share generic names with other folders' parts (``store/base.py``,
    ``transports/base.py``): the folder says whose they are.
    """
    folders = {path.name for path in PACKAGE.rglob("*") if path.is_dir() and (path / "__init__.py").exists()}
    clashes = []
    for folder in [PACKAGE, *(PACKAGE / name for name in sorted(folders))]:
        modules = sorted(path.stem for path in folder.glob("*.py") if path.stem != "__init__")
        nouns = [noun(module) for module in modules]
        clashes += [f"{folder.name}/{m}.py" for m, n in zip(modules, nouns, strict=True) if nouns.count(n) > 1]
        clashes += [
            f"{folder.name}/{m}.py is named like the folder {n}s/ or {n}/"
            for m, n in zip(modules, nouns, strict=True)
            if n in {noun(f) for f in folders} - {noun(folder.name)}
        ]
    assert clashes == []
