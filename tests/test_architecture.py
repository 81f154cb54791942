"""The package's shape, checked: one-way layers, no hidden imports, no private names across modules.

import-linter (``lint-imports``, configured in pyproject.toml and run by CI) checks the layers
and cycles. These tests check what it cannot see: the ``callbacks`` folder (installed as
``lightning_peft.callbacks``), imports inside functions, private names taken from other
modules, generic code reaching into a particular method, and file sizes.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "lightning_peft").rglob("*.py")) + sorted((ROOT / "callbacks").rglob("*.py"))
SCRIPTS = [p for folder in ("tests", "benchmarks", "recipes") for p in sorted((ROOT / folder).rglob("*.py"))]
"""The other Python files: held to the same length as the package, not to its import rules."""
OPTIONAL = {"deepspeed", "peft"}
"""Third-party packages that may be imported inside a function (not installed everywhere)."""
CONTRACT = {"base"}
"""The only module of ``lightning_peft.methods`` generic code may import: the contract."""


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "callbacks":
        parts = ["lightning_peft", "callbacks", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> list[tuple[ast.AST, str, list[str], bool]]:
    """``(node, imported module, names, inside a function)`` for every import of a source file."""
    tree = ast.parse(path.read_text())
    module = _module_name(path)
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((child, alias.name, [], in_function))
            elif isinstance(child, ast.ImportFrom):
                target = _absolute(module, child, path.name == "__init__.py")
                found.append((child, target, [a.name for a in child.names], in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def test_the_layer_contracts_hold():
    binary = shutil.which("lint-imports")
    if binary is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([binary], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_inside_a_function_except_optional_dependencies(path):
    inner = [
        f"line {node.lineno}: {name}"
        for node, name, _, in_function in _imports(path)
        if in_function and name.split(".")[0] not in OPTIONAL
    ]
    assert not inner, f"{path.name} imports inside functions: {inner}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_crosses_a_module_boundary(path):
    taken = [
        f"line {node.lineno}: {name}.{item}"
        for node, name, items, _ in _imports(path)
        if name.startswith("lightning_peft")
        for item in items
        if item.startswith("_") and not item.startswith("__")
    ]
    assert not taken, f"{path.name} imports private names: {taken}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_generic_code_reaches_methods_only_through_the_contract(path):
    if _module_name(path).startswith("lightning_peft.methods"):
        return
    reached = []
    for node, name, items, _ in _imports(path):
        if name == "lightning_peft.methods":
            reached += [
                f"line {node.lineno}: methods.{i}" for i in items if i not in CONTRACT and not i[0].isupper()
            ]
        elif name.startswith("lightning_peft.methods."):
            if name.split(".")[2] not in CONTRACT:
                reached.append(f"line {node.lineno}: {name}")
    assert not reached, f"{path.name} imports a particular method: {reached}"


@pytest.mark.parametrize("path", SOURCES + SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_reads_in_one_sitting(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 600, f"{path.name} has {lines} lines"


def test_nothing_walks_stack_frames():
    users = [p.name for p in SOURCES if "_getframe" in p.read_text() or "f_back" in p.read_text()]
    assert not users


def test_the_package_imports_without_cycles_in_a_fresh_interpreter():
    code = "import lightning_peft, lightning_peft.callbacks, lightning_peft.cli; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
