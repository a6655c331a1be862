"""Model URIs: where the weights live and where the engine finds them inside the pod.

Invariant: ``local_path`` is an absolute path that exists in the engine container once the pod
is running (the init container fills it for hf://, a volume mount provides it for pvc://), and
distinct hf:// (repo, revision) pairs get distinct folders (``cache_folder``).
"""

from __future__ import annotations

import hashlib
import posixpath
import string
from dataclasses import dataclass
from typing import Literal

from . import constants as c

Scheme = Literal["hf", "pvc", "path"]
_SAFE = frozenset(string.ascii_letters + string.digits + "._-")
MAX_FOLDER_CHARS = 200
"""Longest cache folder name (file systems allow 255 bytes); longer ones are cut and hashed."""


@dataclass(frozen=True, slots=True)
class ModelLocation:
    """A parsed ``spec.model.uri``."""

    scheme: Scheme
    repo: str | None  # hf: "org/name"
    revision: str | None  # hf: branch, tag or commit; None means the default branch
    claim: str | None  # pvc: the PersistentVolumeClaim name
    local_path: str

    @property
    def default_served_name(self) -> str:
        if self.repo is not None:
            return self.repo
        return posixpath.basename(self.local_path.rstrip("/")) or "model"


def _legacy_reading(folder: str) -> tuple[str, str | None]:
    org, name, *revision = folder.split("--")
    return f"{org}/{name}", "/".join(revision) or None


def _escape(text: str) -> str:
    """``/`` as ``~``, other characters outside ``[A-Za-z0-9._-]`` as ``%XX`` (UTF-8)."""
    return "".join(
        ch if ch in _SAFE else "~" if ch == "/" else "".join(f"%{b:02X}" for b in ch.encode())
        for ch in text
    )


def cache_folder(repo: str, revision: str | None) -> str:
    """The folder under ``MODELS_DIR`` for ``hf://repo[@revision]``; injective.

    Usually ``org--name[--rev]`` with each ``/`` of the revision as ``--`` (the names of
    earlier releases, so filled caches stay valid), but only where that name reads back as
    exactly this pair: otherwise (a ``--`` in a part, ``@a--b`` next to ``@a/b``) it is
    ``org~name@rev`` with ``/`` as ``~`` and other unsafe characters as ``%XX``. Only the
    second form has an ``@``, and neither a ``+``: a name past ``MAX_FOLDER_CHARS`` is cut and
    ends in ``+`` and 32 hex digits of its SHA-256.
    """
    revision = revision or None
    folder = repo.replace("/", "--") + (f"--{revision.replace('/', '--')}" if revision else "")
    if not (set(folder) <= _SAFE and folder.count("--") >= 1
            and _legacy_reading(folder) == (repo, revision)):
        folder = f"{_escape(repo)}@{_escape(revision or '')}"
    if len(folder) > MAX_FOLDER_CHARS:
        digest = hashlib.sha256(folder.encode()).hexdigest()[:32]
        folder = f"{folder[:MAX_FOLDER_CHARS - 33]}+{digest}"
    return folder


def parse_model_uri(uri: str) -> ModelLocation:
    """Parse a URI that already matched the CRD pattern; raise ValueError for what it cannot see.

    The pattern cannot forbid ``..`` segments (RE2 has no look-ahead), so they are refused here.
    """
    if any(part == ".." for part in uri.split("/")):
        raise ValueError(f"model.uri {uri!r} must not contain '..' path segments")
    if uri.startswith("hf://"):
        ref = uri.removeprefix("hf://")
        repo, _, revision = ref.partition("@")
        folder = cache_folder(repo, revision or None)
        return ModelLocation("hf", repo, revision or None, None, f"{c.MODELS_DIR}/{folder}")
    if uri.startswith("pvc://"):
        claim, _, sub_path = uri.removeprefix("pvc://").partition("/")
        local = posixpath.normpath(f"{c.PVC_MODEL_MOUNT}/{sub_path}")
        return ModelLocation("pvc", None, None, claim, local)
    if uri.startswith("/"):
        return ModelLocation("path", None, None, None, posixpath.normpath(uri))
    raise ValueError(f"model.uri {uri!r} must start with hf://, pvc:// or /")
