"""The cache folder of an hf:// model is injective in (repo, revision), readable, and short
enough for any file system (operator/modeluri.py ``cache_folder``)."""

from __future__ import annotations

import re
import urllib.parse

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from metroline.operator import constants as c
from metroline.operator.modeluri import MAX_FOLDER_CHARS, cache_folder, parse_model_uri
from metroline.operator.spec import MODEL_URI


def decode(folder: str) -> tuple[str, str | None]:
    """The test's own reading of a folder name (not of a cut, hashed one): a left inverse of
    ``cache_folder`` proves it injective."""
    assert "+" not in folder
    if "@" in folder:
        repo, _, revision = folder.partition("@")
        unescape = lambda text: urllib.parse.unquote(text.replace("~", "/"))  # noqa: E731
        return unescape(repo), unescape(revision) or None
    org, name, *revision = folder.split("--")
    return f"{org}/{name}", "/".join(revision) or None


def test_revisions_with_a_slash_and_with_a_double_dash_get_their_own_folders():
    slash = parse_model_uri("hf://org/model@a/b").local_path
    dashes = parse_model_uri("hf://org/model@a--b").local_path
    assert slash != dashes
    assert slash == f"{c.MODELS_DIR}/org--model--a--b"  # the name earlier releases used
    assert dashes == f"{c.MODELS_DIR}/org~model@a--b"


@pytest.mark.parametrize(("repo", "revision", "folder"), [
    ("Qwen/Qwen3-8B", None, "Qwen--Qwen3-8B"),
    ("Qwen/Qwen3-8B", "refs/pr/1", "Qwen--Qwen3-8B--refs--pr--1"),
    ("meta-llama/Llama-2-7b-hf", "abc", "meta-llama--Llama-2-7b-hf--abc"),
    ("a--b/c", None, "a--b~c@"),
    ("a/b--c", None, "a~b--c@"),
    ("a/b-", "c", "a~b-@c"),
    ("a/b", "x-/y", "a~b@x-~y"),
])
def test_folder_names_stay_readable(repo, revision, folder):
    assert cache_folder(repo, revision) == folder
    assert decode(folder) == (repo, revision)


def test_long_revisions_are_cut_and_hashed():
    long = [cache_folder("org/model", "v" * n + tail) for n in (300, 301) for tail in ("", "/x")]
    assert len(set(long)) == 4
    for folder in long:
        assert len(folder) <= MAX_FOLDER_CHARS and re.search(r"\+[0-9a-f]{32}$", folder)
    assert len(cache_folder("org/model", "v" * (MAX_FOLDER_CHARS - 12))) == MAX_FOLDER_CHARS


_PART = st.text(alphabet="ab.-", min_size=1, max_size=6).map(lambda s: "a" + s)
_REVISION = st.none() | st.text(alphabet="ab.-/", min_size=0, max_size=10).map(lambda s: "a" + s)
"""Small alphabets of the URI pattern's characters, with ``-`` and ``/`` often, so that
colliding names come up (the old names collided on ``@a/b`` and ``@a--b``)."""


@settings(max_examples=500, deadline=None)
@given(org=_PART, name=_PART, revision=_REVISION)
def test_every_folder_reads_back_as_its_pair(org, name, revision):
    uri = f"hf://{org}/{name}" + (f"@{revision}" if revision else "")
    assume(".." not in uri.split("/"))  # refused (test_admission.py)
    assert re.fullmatch(MODEL_URI, uri)
    location = parse_model_uri(uri)
    folder = location.local_path.removeprefix(f"{c.MODELS_DIR}/")
    assert "/" not in folder and folder not in ("", ".", "..")
    assert decode(folder) == (f"{org}/{name}", revision)


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(_PART, _PART, _REVISION), min_size=2, max_size=30, unique=True))
def test_distinct_pairs_get_distinct_folders(pairs):
    folders = {cache_folder(f"{org}/{name}", revision) for org, name, revision in pairs}
    assert len(folders) == len(pairs)


@settings(max_examples=200, deadline=None)
@given(repo=st.text(min_size=1, max_size=8), revision=st.none() | st.text(min_size=1, max_size=8))
def test_any_text_gets_a_folder_that_reads_back(repo, revision):
    """Even outside the URI pattern (names the operator never sees) the map stays injective."""
    folder = cache_folder(repo, revision)
    assert "/" not in folder and "\x00" not in folder
    assert decode(folder) == (repo, revision)
