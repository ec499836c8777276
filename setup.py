"""Build hook: the repo root's models.toml (the source) ships inside the package as polargrid_local/models.toml.

Everything else about the build lives in pyproject.toml.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithRegistry(build_py):
    """build_py, plus the default registry copied into the built package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "polargrid_local" / "models.toml"
        self.mkpath(str(target.parent))
        self.copy_file(str(ROOT / "models.toml"), str(target))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / "polargrid_local" / "models.toml")]


setup(cmdclass={"build_py": BuildWithRegistry})
