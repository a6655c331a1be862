"""benchmarks/gpu_suite.sh (the one command a GPU session runs) parses, and every section its
header documents is one it handles."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_documented_sections_are_handled():
    text = SCRIPT.read_text()
    header = text.split("# Sections:", 1)[1].split("set -uo", 1)[0]
    documented = set(re.findall(r"^#   (\w+)(?: / (\w+))?\s", header, re.M))
    documented = {name for pair in documented for name in pair if name}
    handled = set(re.findall(r"^    (\w+)\)", text, re.M))
    assert documented and documented == handled


def test_an_unknown_section_fails(tmp_path):
    result = subprocess.run(
        ["bash", str(SCRIPT), "no-such-section"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "RESULTS": str(tmp_path)},
    )
    assert result.returncode == 1 and "unknown section no-such-section" in result.stderr
