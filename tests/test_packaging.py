"""The wheel a user installs: every subpackage, the registry, kernels under polargrid_local; a light import."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_every_package_and_maps_kernels_under_polargrid_local(tmp_path):
    source = tmp_path / "src"  # a clean copy: a stale build/ folder would hide a package missing from the list
    for name in ("polargrid_local", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md", "models.toml"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("polargrid_local-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {str(Path(n).parent) for n in names if n.endswith("__init__.py")}
    on_disk = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "polargrid_local").rglob("__init__.py")}
    assert on_disk <= shipped, f"missing from the wheel: {sorted(on_disk - shipped)}"
    assert "polargrid_local/kernels/logmel.py" in names
    for name in ("index.html", "app.js", "style.css"):
        shipped_file = f"polargrid_local/server/playground/{name}"
        assert shipped_file in names, f"the playground's {name} must ship in the wheel (package-data)"
        assert zipfile.ZipFile(wheel).read(shipped_file) == (ROOT / shipped_file).read_bytes()
    assert not [n for n in names if n.startswith("kernels/")], "kernels/ must not install as a top-level package"
    assert zipfile.ZipFile(wheel).read("polargrid_local/models.toml") == (ROOT / "models.toml").read_bytes(), \
        "the default registry ships inside the package"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "polargrid-local = polargrid_local.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


HEAVY = ("llama_cpp", "faster_whisper", "ctranslate2", "piper", "onnxruntime", "av", "numba")


def test_importing_the_library_loads_no_engine():
    """A chat-only app pays for llama.cpp only when it loads a model, and never for the speech stacks."""
    code = ("import sys, polargrid_local, polargrid_local.cli, polargrid_local.server; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
