"""The engine flags that the operator renders from spec fields, and how to spot them in
``engine.extraArgs`` (exactly, by alias, or abbreviated as argparse reads them)."""

from __future__ import annotations

MANAGED_FLAGS = frozenset({
    "--tensor-parallel-size", "-tp", "--max-model-len", "--gpu-memory-utilization",
    "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--dtype",
    "--served-model-name", "--host", "--port", "--ready-kv-threshold", "--enable-prefix-caching",
    "--no-enable-prefix-caching",
})
"""Flags (with their aliases, e.g. ``-tp``) rendered from spec fields; setting them again in
extraArgs would be ambiguous. tests/operator/test_engine_cli.py keeps this in step with
``metroline serve``'s parser."""


def managed_flag(arg: str) -> str | None:
    """The rendered flag that ``arg`` would set on the engine's command line, if any.

    The engine parses with argparse, which also takes a unique prefix of a long flag
    (``--tensor-parallel 4``) and refuses an ambiguous one; either way a prefix of a rendered
    flag in extraArgs cannot work as the user meant.
    """
    flag = arg.split("=", 1)[0]
    if flag in MANAGED_FLAGS:
        return flag
    if flag.startswith("--") and len(flag) > 2:
        return next((f for f in sorted(MANAGED_FLAGS) if f.startswith(flag)), None)
    return None


def _prefix_regex(words: list[str]) -> str:
    """RE2 matching every non-empty prefix of every word (a trie of optional groups)."""
    heads: dict[str, list[str]] = {}
    for word in words:
        heads.setdefault(word[0], []).append(word[1:])
    branches = []
    for head, tails in sorted(heads.items()):
        rest = [t for t in tails if t]
        branches.append(head + (f"({_prefix_regex(rest)})?" if rest else ""))
    return "|".join(branches)


def managed_flag_regex() -> str:
    """RE2 matching exactly the arguments for which ``managed_flag`` is not None."""
    long_flags = sorted(f.removeprefix("--") for f in MANAGED_FLAGS if f.startswith("--"))
    short = sorted(f for f in MANAGED_FLAGS if not f.startswith("--"))
    return f"^({'|'.join(short)}|--({_prefix_regex(long_flags)}))(=|$)"
