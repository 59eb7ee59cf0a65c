"""The layering of docs/ARCHITECTURE.md holds in the code, and no module outgrows one sitting.

Every import is read from the source (module level and inside functions), mapped to its package
(``tdamil.<first part>``) and checked against the table's "may import" column.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"tdamil": "tdamil", "server": "tdamil.server", "client": "tdamil.client", "simulation": "tdamil.simulation"}
MAX_LINES = 500


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "tdamil" and len(parts) > 1 else parts[0]


def _allowed_table() -> dict[str, set[str]]:
    """``package -> packages it may import`` from the table in docs/ARCHITECTURE.md."""
    rows: dict[str, list[str]] = {}
    for line in (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"tdamil(\.\w+)?", cells[0]):
            rows[cells[0]] = [c.strip() for c in cells[2].split(",")]
    core = []
    for name in rows:  # table order: every row above tdamil.server is core
        if name == "tdamil.server":
            break
        core.append(name)
    allowed: dict[str, set[str]] = {}
    for name, deps in rows.items():
        out: set[str] = set()
        for dep in deps:
            if dep == "every core package":
                out |= set(core)
            elif dep != "-":
                out.add(dep)
        allowed[name] = out
    return allowed


def _source_files() -> list[tuple[str, Path]]:
    files = []
    for folder, name in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            module = ".".join([name, *parts])
            files.append((module, path))
    return files


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "tdamil" or m.startswith("tdamil.")}


def _owner(module: str) -> str:
    """The table row a module belongs to: its package, or the single-module entry (tdamil.config)."""
    return _package(module) if module != "tdamil" else "tdamil"


def test_every_import_follows_the_documented_layers() -> None:
    allowed = _allowed_table()
    assert {"tdamil.data", "tdamil.models", "tdamil.server", "tdamil.client", "tdamil.simulation"} <= set(allowed)
    broken, undocumented = [], set()
    for module, path in _source_files():
        owner = _owner(module)
        if owner not in allowed:
            undocumented.add(owner)
            continue
        for imported in _imports(path):
            target = _owner(imported)
            if target != owner and target not in allowed[owner]:
                broken.append(f"{path.relative_to(REPO)} imports {imported} ({owner} may not import {target})")
    assert not undocumented, f"packages missing from docs/ARCHITECTURE.md: {sorted(undocumented)}"
    assert not broken, "\n".join(broken)


def test_the_core_never_imports_the_apps() -> None:
    offenders = [f"{path.relative_to(REPO)}: {m}" for module, path in _source_files() if module.startswith("tdamil.")
                 and _owner(module) not in {"tdamil.server", "tdamil.client", "tdamil.simulation"}
                 for m in _imports(path) if _owner(m) in {"tdamil.server", "tdamil.client", "tdamil.simulation"}]
    assert not offenders


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a models module importing the server would be reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tdamil.server.server_app import app\n", encoding="utf-8")
    assert _imports(bad) == {"tdamil.server.server_app"}
    assert "tdamil.server" not in _allowed_table()["tdamil.models"]


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_no_module_over_500_lines(folder: str) -> None:
    long = {str(p.relative_to(REPO)): n for p in (REPO / folder).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"
