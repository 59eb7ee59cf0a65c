"""The built wheel installs only the `tdamil` namespace: `server/` and `client/` never become
generic top-level packages in site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (whl,) = out.glob("tdamil_fl-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_has_only_the_tdamil_top_level(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"tdamil"}, f"unexpected top-level entries in {wheel.name}: {sorted(tops)}"
    assert "tdamil/server/__init__.py" in names
    assert "tdamil/client/__init__.py" in names
    assert "tdamil/simulation/__init__.py" in names
    assert not any(n.startswith(("server/", "client/", "simulation/", "tests/")) for n in names)


@pytest.mark.slow
def test_wheel_carries_every_source_module(wheel: Path) -> None:
    """Every .py file of tdamil/, server/, client/ and simulation/ is in the wheel at its mapped place."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    expected = set()
    for folder, prefix in (("tdamil", "tdamil"), ("server", "tdamil/server"), ("client", "tdamil/client"),
                           ("simulation", "tdamil/simulation")):
        for py in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in py.parts:
                continue
            expected.add(f"{prefix}/{py.relative_to(ROOT / folder).as_posix()}")
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel (add an __init__.py to their folder?): {missing}"


@pytest.mark.slow
def test_wheel_console_scripts_point_into_tdamil(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        (ep,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")] or [None]
        text = zf.read(ep).decode() if ep else ""
    targets = [line.split("=", 1)[1].strip() for line in text.splitlines() if "=" in line]
    assert all(t.startswith("tdamil.") for t in targets), targets


@pytest.mark.slow
def test_installed_wheel_imports_server_and_client_under_tdamil(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin") == [
        "tdamil"
    ]
    code = (
        "import importlib.util, sys;"
        "import tdamil.server, tdamil.client;"
        "print(tdamil.server.__file__);"
        "print(importlib.util.find_spec('server') is None and importlib.util.find_spec('client') is None)"
    )
    # Run from an empty folder with only the wheel's target on the path (no repo checkout visible).
    res = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith(str(target)), lines
    assert lines[1] == "True"
