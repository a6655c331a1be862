"""The folders engine/, kernels/, operator/ install as metroline.engine/kernels/operator."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "engine": "metroline.engine",
    "kernels": "metroline.kernels",
    "operator": "metroline.operator",
    "benchmarks": "metroline.benchmarks",
}


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {package: folder for folder, package in FOLDERS.items()}
    listed = set(config["packages"])
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == listed


def test_operator_folder_never_shadows_the_standard_library():
    code = "import operator, metroline.operator as m; print(operator.__file__); print(m.__file__)"
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    stdlib_file, package_file = result.stdout.split()
    assert not stdlib_file.startswith(str(ROOT))
    assert Path(package_file).parent == ROOT / "operator"
