"""The server distribution's one build step beyond pyproject.toml: its wheel leaves out what the
client distribution (aiaas-client, clients/python/pyproject.toml) ships and this one requires, so
no file belongs to two distributions. Editable installs map the whole aiaas/ folder either way."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CLIENT = tomllib.loads((Path(__file__).resolve().parent / "clients" / "python" / "pyproject.toml").read_text())
CLIENT_PACKAGES = frozenset(CLIENT["tool"]["setuptools"]["packages"]) - {"aiaas"}
CLIENT_MODULES = frozenset(CLIENT["tool"]["aiaas-client"]["modules"])


class ServerBuildPy(build_py):
    def finalize_options(self) -> None:
        super().finalize_options()
        self.packages = [p for p in self.distribution.packages or () if p not in CLIENT_PACKAGES]

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        found = super().find_package_modules(package, package_dir)
        return [m for m in found if m[1] not in CLIENT_MODULES] if package == "aiaas" else found


setup(cmdclass={"build_py": ServerBuildPy})
