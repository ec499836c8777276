"""The Makefile's entry to polargrid_local/host/build_llama.py (`polargrid-local install-llama` once installed).

Loads that module by path, not through the package: this runs before the project and its dependencies are installed.
"""
import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "polargrid_local" / "host" / "build_llama.py"
_SPEC = importlib.util.spec_from_file_location("polargrid_build_llama", _PATH)
build_llama = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(build_llama)

if __name__ == "__main__":
    sys.exit(build_llama.main())
