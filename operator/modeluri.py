"""Model URIs: where the weights live and where the engine finds them inside the pod.

Invariant: ``local_path`` is an absolute path that exists in the engine container once the pod
is running (the init container fills it for hf://, a volume mount provides it for pvc://).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Literal

from . import constants as c

Scheme = Literal["hf", "pvc", "path"]


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


def parse_model_uri(uri: str) -> ModelLocation:
    """Parse a URI that already matched the CRD pattern; raise ValueError for what it cannot see.

    The pattern cannot forbid ``..`` segments (RE2 has no look-ahead), so they are refused here.
    """
    if any(part == ".." for part in uri.split("/")):
        raise ValueError(f"model.uri {uri!r} must not contain '..' path segments")
    if uri.startswith("hf://"):
        ref = uri.removeprefix("hf://")
        repo, _, revision = ref.partition("@")
        folder = repo.replace("/", "--") + (f"--{revision.replace('/', '--')}" if revision else "")
        return ModelLocation("hf", repo, revision or None, None, f"{c.MODELS_DIR}/{folder}")
    if uri.startswith("pvc://"):
        claim, _, sub_path = uri.removeprefix("pvc://").partition("/")
        local = posixpath.normpath(f"{c.PVC_MODEL_MOUNT}/{sub_path}")
        return ModelLocation("pvc", None, None, claim, local)
    if uri.startswith("/"):
        return ModelLocation("path", None, None, None, posixpath.normpath(uri))
    raise ValueError(f"model.uri {uri!r} must start with hf://, pvc:// or /")
