"""Fill a wheelhouse with every dependency of polargrid-local, for installs with no network (tests/test_install.py).

The dependencies come from pyproject.toml, downloaded as wheels by pip (the user's index settings apply);
llama-cpp-python comes from the wheel cache of scripts/build_llama_cpp.py (it is built here, never downloaded).
Usage: python scripts/wheelhouse.py DIR
"""
import importlib.util
import shutil
import subprocess
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    dest = Path(sys.argv[1]).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [d for d in project["dependencies"] if not d.startswith("llama-cpp-python")]
    deps += ["typing-extensions>=4.5", "diskcache>=5.6.1", "jinja2>=2.11.3"]  # llama-cpp-python's own
    subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--disable-pip-version-check",
                    "--quiet", "-d", str(dest), *deps], check=True)
    spec = importlib.util.spec_from_file_location("build_llama", ROOT / "polargrid_local" / "host" / "build_llama.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    wheel = build.cached_wheel(build.cmake_args(False, None, False), sys.executable)
    shutil.copy2(wheel, dest / wheel.name)
    print(f"wheelhouse ready: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
