"""The Flower App Bundle (FAB) the coordinator submits: configuration only, no code.

Flower 1.42 (``flwr-serverapp`` / ``flwr-clientapp``) unpacks a run's FAB into
``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>/``, puts that folder first on ``sys.path`` and
imports the components named in its ``[tool.flwr.app.components]``. Our bundle holds nothing but a
``pyproject.toml`` naming ``tdamil.server.server_app:app`` and ``tdamil.client.client_app:app``, so
those imports resolve to the tdamil-fl package installed at each site (the code the hospital has
reviewed and installed), never to code shipped by the coordinator. Per-run dependency installation
is disabled on both sides (``--disable-runtime-dependency-installation`` at the SuperLink; the
SuperNode's is off unless ``--allow-runtime-dependency-installation`` is given).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

from tdamil import __version__

__all__ = ["COMPONENTS", "APP_CONFIG_DEFAULTS", "fab_pyproject", "write_app_dir", "fab_members"]

PUBLISHER = "tdamil"
APP_NAME = "tdamil-fl"
COMPONENTS = {"serverapp": "tdamil.server.server_app:app", "clientapp": "tdamil.client.client_app:app"}
# Run-config keys the ServerApp reads (overridden per run with `flwr run --run-config`).
# site-nodes: a JSON file {node id: site} the coordinator writes after registering the sites' keys.
APP_CONFIG_DEFAULTS: dict[str, Any] = {"server-config": "", "output-dir": "", "resume": False, "session-id": "",
                                       "site-nodes": ""}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def fab_pyproject(version: str = __version__) -> str:
    """The bundle's only file: project metadata + the components to import from the installed package."""
    lines = [
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        f'version = "{version}"',
        'description = "tdamil-fl run bundle: configuration only; sites run their installed tdamil-fl"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        f'publisher = "{PUBLISHER}"',
        "",
        "[tool.flwr.app.components]",
        *(f'{k} = "{v}"' for k, v in COMPONENTS.items()),
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {_toml_value(v)}" for k, v in APP_CONFIG_DEFAULTS.items()),
        "",
    ]
    return "\n".join(lines)


def write_app_dir(folder: str | Path) -> Path:
    """Write the bundle's source folder (just ``pyproject.toml``) for ``flwr run <folder>``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if stale.is_file():
            stale.unlink()
    (folder / "pyproject.toml").write_text(fab_pyproject(), encoding="utf-8")
    return folder


def fab_members(fab: bytes) -> list[str]:
    """File names inside a FAB (tests: the bundle carries no code)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        return sorted(zf.namelist())
