"""What ``model`` names: a local checkpoint directory, or a Hugging Face model id.

A directory that exists wins. Otherwise ``org/name`` (or ``name``) is looked up in the local
Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``: the ``models--org--name/snapshots/<commit>/`` layout, with
``refs/<branch or tag>`` naming a commit), at ``revision`` (a branch, a tag or a commit;
default ``main``). A snapshot holding ``config.json`` and its safetensors weights is used as
it is, without asking the hub for a newer commit; otherwise, unless ``HF_HUB_OFFLINE`` is
set, the weights, config and tokenizer files are downloaded into that cache through
``huggingface_hub`` (only the shards the index names, no sub-folders). Every failure is a
``ValueError`` naming the id, the revision and the cache folder searched. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

#: Files beside the weights: config, generation config, tokenizer, chat template, shard index.
METADATA_PATTERNS = ("*.json", "*.txt", "*.jinja", "*.tiktoken", "tokenizer.model")
#: Sub-folders (``original/``, ``onnx/``, ...) hold other formats of the same weights.
IGNORED_PATTERNS = ("*/*",)
_INDEX = "model.safetensors.index.json"
#: Longest revision accepted (git refs are short; a commit hash has 40 characters).
MAX_REVISION_CHARS = 256


def hub_cache_dir() -> Path:
    """The cache folder ``huggingface_hub`` uses, read from the environment now (its own
    constant is read once, at import)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        home = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set true, as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model_path(model: str | Path, revision: str | None = None) -> Path:
    """The local directory of ``model`` (see the module docstring); raises ``ValueError``."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} applies to a Hugging Face model id, but {model!s} is a "
                "local directory; drop revision (or --revision)"
            )
        return path
    repo_id = str(model)
    if not _is_repo_id(repo_id):
        raise ValueError(
            f"model must be a local checkpoint directory or a Hugging Face model id "
            f"('org/name'); {model!s} is not one (no such directory, nor a valid model id)"
        )
    _check_revision(revision)
    return _from_hub(repo_id, revision)


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.startswith(("/", ".", "~")) or "\\" in text:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _check_revision(revision: str | None) -> None:
    if revision is None:
        return
    if (
        not isinstance(revision, str)
        or not revision
        or len(revision) > MAX_REVISION_CHARS
        or revision.startswith("/")
        or ".." in revision.split("/")
        or "\\" in revision
    ):
        raise ValueError(
            f"revision must be a branch, tag or commit of at most {MAX_REVISION_CHARS} "
            f"characters without '..' segments; got {revision!r}"
        )


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    shown = revision or "main"
    where = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = None
    with contextlib.suppress(LocalEntryNotFoundError):  # not cached: snapshot stays None
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache,
                local_files_only=True,
                allow_patterns=list(METADATA_PATTERNS),
            )
        )
    if snapshot is not None and (_has_weights(snapshot) or hub_offline()):
        logger.info("model %s (revision %s) from the cache: %s", repo_id, shown, snapshot)
        return snapshot
    if hub_offline():
        raise ValueError(
            f"model {repo_id!r} is not a local directory, and the Hugging Face cache holds no "
            f"snapshot of it at revision {shown!r}: searched {where}"
            + _cached_revisions(where)
            + "; HF_HUB_OFFLINE is set, so nothing was downloaded"
        )
    try:
        return _download(repo_id, revision, cache)
    except Exception as error:  # every hub or network failure becomes one clear message
        raise ValueError(
            f"model {repo_id!r} is not a local directory, the Hugging Face cache ({where}) "
            f"holds no complete snapshot of it at revision {shown!r}"
            + _cached_revisions(where)
            + f", and downloading it failed: {type(error).__name__}: {_first_line(error)}"
        ) from None


def _download(repo_id: str, revision: str | None, cache: Path) -> Path:
    """Config and tokenizer files first, then only the weight shards the index names."""
    from huggingface_hub import snapshot_download

    logger.info("downloading %s (revision %s) into %s", repo_id, revision or "main", cache)
    common = dict(repo_id=repo_id, revision=revision, cache_dir=cache)
    snapshot = Path(
        snapshot_download(
            **common, allow_patterns=list(METADATA_PATTERNS), ignore_patterns=IGNORED_PATTERNS
        )
    )
    index = snapshot / _INDEX
    if index.is_file():
        weights = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        weights = ["*.safetensors"]
    snapshot_download(**common, allow_patterns=weights, ignore_patterns=IGNORED_PATTERNS)
    return snapshot


def _has_weights(snapshot: Path) -> bool:
    """``config.json`` and every safetensors shard the index names (or some safetensors)."""
    if not (snapshot / "config.json").is_file():
        return False
    index = snapshot / _INDEX
    if not index.is_file():
        return any(snapshot.glob("*.safetensors"))
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError):
        return False
    return all((snapshot / name).is_file() for name in names)


def _cached_revisions(repo_folder: Path) -> str:
    """``" (cached: refs main, v2; snapshots 0123..., 4567...)"``, or "" when none is."""

    def names(folder: Path, files: bool) -> list[str]:
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p.is_file() if files else p.is_dir()))

    refs, snapshots = names(repo_folder / "refs", True), names(repo_folder / "snapshots", False)
    parts = [f"{kind} {', '.join(found[:10])}" for kind, found in
             (("refs", refs), ("snapshots", snapshots)) if found]  # fmt: skip
    return f" (cached: {'; '.join(parts)})" if parts else ""


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
