"""The package's shape (docs/architecture.md): layers import only the layers below them, and no
module imports itself back through others, counting imports inside functions and under
TYPE_CHECKING.  Read from the source with ``ast``, so nothing is imported to check it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_upstream"

# Bottom first.  A package may import its own modules and those of packages in lower layers;
# packages on one layer do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("config",),
    ("store", "upstream", "messages"),
    ("formats", "capture", "pages"),
    ("repro",),
    ("engine",),
    ("server", "clients"),
    ("admin",),
    ("pytest_plugin", "cli"),
]
FACADE = {"pytest_upstream", "pytest_upstream.__main__"}  # the package's public face, above all
MAX_LINES = 500
LONG_MODULE_REASON = "Longer than"  # a module over MAX_LINES says why in its docstring


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every module of the package that ``name`` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in MODULES else base for t in targets]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` names module a.b.c
                target = target.rpartition(".")[0]
            if target.startswith("pytest_upstream") and target != name:
                yield target


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _layer_of(module: str) -> tuple[int, str]:
    top = module.split(".")[1] if module.count(".") >= 1 else ""
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index, top
    raise AssertionError(f"{module} is in no layer of docs/architecture.md: add its package to LAYERS")


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        if module not in FACADE:
            _layer_of(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in FACADE))
def test_a_layer_imports_only_layers_below_it(module: str) -> None:
    layer, package = _layer_of(module)
    for target in GRAPH[module]:
        assert target not in FACADE, f"{module} imports the package facade {target}"
        target_layer, target_package = _layer_of(target)
        assert target_package == package or target_layer < layer, (
            f"{module} (layer {layer}, {package}) imports {target} (layer {target_layer}, {target_package})"
        )


def _cycle() -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in GRAPH[module]:
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)) is not None:
                return found
        path.pop()
        state[module] = 2
        return None

    for module in GRAPH:
        if module not in state and (found := visit(module)) is not None:
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check itself can fail: a graph with a cycle is reported."""
    saved = dict(GRAPH)
    try:
        GRAPH["pytest_upstream.config.keys"] = [
            *GRAPH["pytest_upstream.config.keys"],
            "pytest_upstream.cli.main",
        ]
        cycle = _cycle()
        assert cycle is not None and cycle[0] == cycle[-1]
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small_or_say_why(module: str) -> None:
    text = MODULES[module].read_text()
    lines = text.count("\n")
    if lines > MAX_LINES:
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert LONG_MODULE_REASON in doc, (
            f"{module} has {lines} lines (over {MAX_LINES}): split it, or say in its docstring "
            f"'{LONG_MODULE_REASON} {MAX_LINES} lines because ...'"
        )
