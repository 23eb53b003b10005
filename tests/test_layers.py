"""The floor plan: packager's modules import only downward, never in a circle.

Every import counts, including those inside functions (a lazy import hides a cycle, it does not
remove it). The layers are docs/design.md's floor plan; a new module must be given one here.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "packager"

# lowest first; a module may import its own layer's modules (acyclically) and anything below.
# A name ending in ".*" places a whole package (the package itself and everything under it).
LAYERS: list[tuple[str, set[str]]] = [
    ("values", {"packager", "packager.errors", "packager.env", "packager.home", "packager.fsutil",
                "packager.locking", "packager.registry", "packager.spec", "packager.report"}),
    ("formats", {"packager.formats.*"}),
    ("catalog", {"packager.discovery", "packager.snapshot"}),
    ("transport", {"packager.transport.*"}),
    ("config", {"packager.config"}),
    ("stores", {"packager.cache.*", "packager.bundle", "packager.bundle_write", "packager.mirror", "packager.signing",
                "packager.delta", "packager.oci.*", "packager.channels"}),
    ("loader", {"packager.loader"}),
    ("cli", {"packager.cli.*", "packager.__main__"}),
]
OUTSIDE = {"packager.testing"}  # test helpers: may use anything, nothing may use them


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str | None = None) -> set[str]:
    """Every packager module ``path`` (module ``name``) imports, at any depth in the file."""
    name = name or _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # "from . import cache" names a module
                found.add(f"{target}.{alias.name}")
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")
            if not _module_name(p).startswith(tuple(OUTSIDE))}


def _layer(module: str) -> int:
    for index, (_name, members) in enumerate(LAYERS):
        if module in members or any(m.endswith(".*") and (module == m[:-2] or module.startswith(m[:-1]))
                                    for m in members):
            return index
    raise AssertionError(f"{module} has no layer: add it to tests/test_layers.py and the floor plan in docs/design.md")


def test_every_module_has_a_layer():
    for module in _graph():
        _layer(module)


def test_imports_point_down():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
              for m, deps in sorted(_graph().items()) for d in sorted(deps)
              if d != "packager" and _layer(d) > _layer(m)]
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    graph = {m: {d for d in deps if d != "packager"} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]) if dep in stack else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_over_900_lines_and_no_function_over_80():
    """The size rule of the project: a module that outgrows 900 lines has two jobs; a function over 80 lines
    has steps that want names."""
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > 900:
            too_big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_big.append(f"{path.relative_to(ROOT)}: {node.name}() {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, "\n".join(too_big)


def test_nothing_uses_the_test_helpers():
    users = [m for m, deps in _graph().items() if any(d.startswith("packager.testing") for d in deps)]
    assert not users


def test_the_checker_sees_function_level_imports(tmp_path):
    """The cycle check must not be fooled by imports hidden inside functions."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from .cache import fetch\n    from . import bundle\n    import packager.loader\n")
    assert _imports(source, "packager.probe") - {"packager"} == {"packager.cache", "packager.bundle", "packager.loader"}


@pytest.mark.parametrize("module", ["packager.cli", "packager.registry", "packager.snapshot", "packager.cache",
                                    "packager.bundle", "packager.mirror", "packager.formats.signature",
                                    "packager.formats.volumes", "packager.transport.oci", "packager.oci",
                                    "packager.formats.image"])
def test_data_modules_do_not_import_torch(module):
    code = f"import sys, importlib; importlib.import_module({module!r}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
