"""The package's shape: modules one can read in a sitting, imports that flow one way."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "forgetdiag"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = file
    return out


def _imports(file: Path, modules: dict[str, Path], *, module_level: bool) -> set[str]:
    """forgetdiag modules ``file`` imports (at module level, or anywhere in it)."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    guarded = {  # what `if TYPE_CHECKING:` guards is imported for annotations only, never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    nodes = [n for n in (tree.body if module_level else ast.walk(tree)) if id(n) not in guarded]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("forgetdiag"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found |= submodules or {node.module}  # `from pkg import submodule` needs the submodule
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("forgetdiag")}
    return found & set(modules)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in path:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [node])
    return cycles


def test_no_module_is_longer_than_450_lines():
    long = {
        str(f.relative_to(PACKAGE.parent)): n
        for f in PACKAGE.rglob("*.py")
        if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules: {long}"


def test_no_import_cycle_inside_the_package():
    modules = _modules()
    for module_level in (True, False):  # deferred imports inside functions count too
        graph = {name: _imports(file, modules, module_level=module_level) - {name} for name, file in modules.items()}
        assert _cycles(graph) == [], "import cycle"


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_computation_never_imports_presentation():
    """Analyses return numbers; rich, typer and plotly stay in render/ and cli/."""
    for file in [*PACKAGE.glob("*.py"), *(PACKAGE / "analyses").glob("*.py")]:
        if file.name == "__main__.py":  # the console entry point runs the CLI
            continue
        text = file.read_text(encoding="utf-8")
        for lib in ("rich", "typer", "plotly", "forgetdiag.render", "forgetdiag.cli"):
            assert f"import {lib}" not in text and f"from {lib}" not in text, (file.name, lib)
