"""Every third-party module the installed code imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions, requires
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("tdamil", "server", "client", "simulation")
# not on PyPI: MahmoodLab's CONCH is installed by hand from its repository (tdamil/wsi/encoders.py says how)
NOT_ON_PYPI = {"conch"}


def _top_level_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for root in ROOTS:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> set[str]:
    """Names declared in pyproject, plus what their extras pull in (flwr[simulation] brings ray)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {_name(r) for r in reqs}
    for req in reqs:
        for extra in re.findall(r"\[([^\]]+)\]", req.split(";")[0])[:1]:
            for sub in (requires(_name(req)) or []):
                if any(f"extra == \"{e.strip()}\"" in sub.replace("'", '"') for e in extra.split(",")):
                    names.add(_name(sub))
    return names


def test_every_imported_distribution_is_declared():
    dists = packages_distributions()
    declared = _declared()
    missing = {}
    for module, files in _top_level_imports().items():
        if module in sys.stdlib_module_names or module in ("tdamil", "__future__") or module in NOT_ON_PYPI:
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(files)[:3]
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
