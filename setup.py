"""Package layout only; all metadata lives in pyproject.toml.

The repository keeps the given top-level folders (`tdamil/`, `server/`, `client/`), but only the
`tdamil` name is installed: `server/` becomes `tdamil.server` and `client/` becomes `tdamil.client`.
"""

from setuptools import find_packages, setup

ROOTS = {"tdamil": "tdamil", "tdamil.server": "server", "tdamil.client": "client"}

packages = []
package_dir = {}
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir, include_package_data=True)
