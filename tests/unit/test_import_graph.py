"""Our packages' import graph, read with ast from the source: no cycles, the layering, single definitions."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _packages() -> dict[str, Path]:
    """Our top-level packages and their folders: the client, and the server wheel's package-dir."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    package_dir = pyproject["tool"]["setuptools"]["package-dir"]
    return {"piaa_client": REPO_ROOT / "client" / "piaa_client"} | {
        name: REPO_ROOT / folder for name, folder in package_dir.items()
    }


PACKAGES = _packages()
GENERATED = ("piaa_client.api",)
"""Generated stubs: not our code, and they import only grpc and protobuf."""

LAYERS = ("piaa_personalization", "piaa_bench")
FORBIDDEN = {
    "piaa_client": tuple(name for name in PACKAGES if name != "piaa_client"),
    "piaa_common": tuple(name for name in PACKAGES if name != "piaa_common"),
    "piaa_export": LAYERS,
    "piaa_triton": LAYERS,
}
"""Which packages each package may not import: the client installs alone, the model side knows no gateway,
piaa_common (stdlib only, under both) none of ours."""

SKIPPED_DIRS = {"__pycache__", "build", "node_modules"}


def _is_generated(module: str) -> bool:
    return any(module == g or module.startswith(g + ".") for g in GENERATED)


def discover_modules() -> dict[str, Path]:
    """Dotted module name → source file, for every .py under the package folders except generated code.

    Walked, not listed, so the test follows modules as they move between subpackages.
    """
    modules = {}
    for package, folder in PACKAGES.items():
        assert folder.is_dir(), f"package folder {folder} is missing"
        for path in sorted(folder.rglob("*.py")):
            if SKIPPED_DIRS & set(path.relative_to(folder).parts):
                continue
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if not _is_generated(name):
                modules[name] = path
    return modules


def imported_names(module: str, path: Path) -> Iterator[str]:
    """Every name the source imports, at any depth; `from m import x` yields m.x (submodule or name).

    Imports inside functions and under `if TYPE_CHECKING:` count too: a deferred cycle is still a cycle.
    """
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            yield from (f"{source}.{alias.name}" for alias in node.names)


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific known module a name refers to; None for outside or generated code."""
    if _is_generated(name):
        return None
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module → the modules of ours it imports (from m import x: m.x when x is a submodule, else m)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {resolve(imported, modules) for imported in imported_names(name, path)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module, as a path that returns to it."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    nxt.append(succ)
        frontier = nxt
    return component


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return discover_modules()


def test_the_walk_finds_every_package_and_skips_generated_stubs(modules: dict[str, Path]) -> None:
    named = {"piaa_client", "piaa_export", "piaa_triton", "piaa_personalization", "piaa_bench"}
    assert named <= set(PACKAGES) and set(PACKAGES) <= set(modules)
    assert {"piaa_client.client", "piaa_export.fitting", "piaa_export.runtime"} <= set(modules)
    assert not [m for m in modules if m.startswith("piaa_client.api")]


def test_the_graph_resolves_submodules_relative_and_function_level_imports(tmp_path: Path) -> None:
    files = {
        "pkg": "from . import b\n",
        "pkg.a": "",
        "pkg.b": (
            "from pkg import a, CONSTANT\n"
            "from .c import thing\n"
            "def f():\n"
            "    import pkg.d.e\n"
            "    import numpy\n"
            "    from piaa_client.api.v1 import piaa_pb2\n"
        ),
        "pkg.c": "",
        "pkg.d": "",
    }
    modules = {}
    for name, text in files.items():
        path = tmp_path.joinpath(*name.split("."), "__init__.py") if name == "pkg" else None
        path = path or tmp_path.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        modules[name] = path
    modules["piaa_client"] = modules["pkg.a"]
    graph = import_graph(modules)
    # a is a submodule, CONSTANT a name in pkg, e unknown below pkg.d; numpy and generated stubs are left out.
    assert graph["pkg.b"] == {"pkg", "pkg.a", "pkg.c", "pkg.d"}
    assert graph["pkg"] == {"pkg.b"}


def test_cycles_are_found_and_named() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    (cycle,) = [c for c in strongly_connected(graph) if len(c) > 1]
    assert cycle == ["a", "b", "c"]
    assert a_cycle(graph, cycle) == ["a", "b", "c", "a"]


def test_no_import_cycles(modules: dict[str, Path]) -> None:
    graph = import_graph(modules)
    cycles = [" -> ".join(a_cycle(graph, c)) for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_packages_keep_their_layers(modules: dict[str, Path]) -> None:
    breaches = []
    for name, path in modules.items():
        package = name.split(".")[0]
        for imported in imported_names(name, path):
            if imported.split(".")[0] in FORBIDDEN.get(package, ()):
                breaches.append(f"{name} imports {imported}")
    assert not breaches, "\n".join(sorted(set(breaches)))


def _repo_python_files() -> Iterator[Path]:
    for path in sorted(REPO_ROOT.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).parts
        if not any(p.startswith(".") or p in SKIPPED_DIRS for p in parts[:-1]):
            yield path


def test_free_port_is_defined_once_in_the_tree() -> None:
    definitions = [
        f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
        for path in _repo_python_files()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "free_port"
    ]
    assert len(definitions) == 1, f"def free_port should exist exactly once, found: {definitions}"


def test_no_parse_known_args(modules: dict[str, Path]) -> None:
    # Unknown flags must fail loudly instead of being ignored.
    uses = [
        f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
        for path in modules.values()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Attribute) and node.attr == "parse_known_args"
    ]
    assert not uses, f"parse_known_args in {uses}"
