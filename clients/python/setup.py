"""The client distribution's one build step beyond pyproject.toml: of the modules directly in
aiaas/, its wheel keeps only those `[tool.aiaas-client] modules` names (the rest are the server's)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIG = tomllib.loads((Path(__file__).resolve().parent / "pyproject.toml").read_text())
MODULES = frozenset(CONFIG["tool"]["aiaas-client"]["modules"])


class ClientBuildPy(build_py):
    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        found = super().find_package_modules(package, package_dir)
        return [m for m in found if m[1] in MODULES] if package == "aiaas" else found


setup(cmdclass={"build_py": ClientBuildPy})
