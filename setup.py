"""Package layout only; all metadata lives in pyproject.toml.

The repository keeps the given top-level folders (`tdamil/`, `server/`, `client/`, `simulation/`), but
only the `tdamil` name is installed: `server/` becomes `tdamil.server`, `client/` becomes `tdamil.client`
and `simulation/` (the layer above both apps) becomes `tdamil.simulation`.
"""

from setuptools import find_packages, setup

ROOTS = {"tdamil": "tdamil", "tdamil.server": "server", "tdamil.client": "client", "tdamil.simulation": "simulation"}

packages = []
package_dir = {}
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir, include_package_data=True)
