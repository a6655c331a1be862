"""The two image builds start in a background thread when collection ends, so their few
minutes of pip installs overlap the rest of the suite; the ``built`` fixture joins them.

The thread only waits on the builds' subprocesses. A session that selects no test needing
the builds starts none; an interrupted one exits without waiting for them.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from .dockerfile_steps import Build, build_context

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
#: Build arguments per image: the engine's torch is this machine's, from its index.
BUILD_ARGS = {
    "operator": {},
    "engine": {"TORCH_VERSION": torch.__version__, "TORCH_INDEX_URL": "https://pypi.org/simple"},
}
_FUTURE = pytest.StashKey[Future]()


def _context(image: str, scratch: Path) -> Path:
    """The build context the image's Dockerfile sees, copied to ``scratch / "context"``."""
    files = build_context(REPO, IMAGES / image / "Dockerfile.dockerignore")
    target = scratch / "context"
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)
    return target


def _build_all(scratch: Path) -> dict[str, Build | subprocess.CalledProcessError]:
    """Each image built in turn; a failed step is returned in the image's place."""
    builds: dict[str, Build | subprocess.CalledProcessError] = {}
    for image, args in BUILD_ARGS.items():
        folder = scratch / image
        folder.mkdir(parents=True)
        build = Build(IMAGES / image / "Dockerfile", _context(image, folder), folder / "root", args)
        try:
            build.run()
        except subprocess.CalledProcessError as error:
            builds[image] = error
        else:
            builds[image] = build
    return builds


def background_builds(config: pytest.Config) -> Future:
    """The builds' future, started now if collection did not start it."""
    if _FUTURE not in config.stash:
        scratch = config._tmp_path_factory.mktemp("image-builds")  # pytest's own tmp_path_factory
        future: Future = Future()

        def work() -> None:
            try:
                future.set_result(_build_all(scratch))
            except BaseException as error:  # re-raised by the fixture's result()
                future.set_exception(error)

        # A daemon thread: an interrupted session exits without waiting for pip.
        threading.Thread(target=work, name="image-builds", daemon=True).start()
        config.stash[_FUTURE] = future
    return config.stash[_FUTURE]


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any("built" in getattr(item, "fixturenames", ()) for item in session.items):
        background_builds(session.config)
