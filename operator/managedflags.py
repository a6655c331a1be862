"""How ``metroline serve`` reads its command line, without importing the engine: the flags that
the operator renders from spec fields, how to spot them in ``engine.extraArgs`` (exactly, by
alias, or abbreviated as argparse reads them), and ``read_serve_args``, which reads a whole
command line with a stdlib argparse parser built from ``ENGINE_FLAGS``, a copy of the engine's
flag table (tests/operator/test_engine_cli.py fails when the two drift apart and prints the new
table), so the operator accepts exactly the command lines the engine's parser accepts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

MANAGED_FLAGS = frozenset({
    "--tensor-parallel-size", "-tp", "--max-model-len", "--gpu-memory-utilization",
    "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--dtype",
    "--served-model-name", "--host", "--port", "--ready-kv-threshold", "--enable-prefix-caching",
    "--no-enable-prefix-caching", "--revision", "--config",
})
"""Flags extraArgs may not set: those (with their aliases, e.g. ``-tp``) rendered from spec
fields, where setting them again would be ambiguous, and the two of :data:`REFUSED_FLAGS`.
tests/operator/test_engine_cli.py keeps this in step with ``metroline serve``'s parser."""

REFUSED_FLAGS = {
    "--revision": (
        "but the model the operator renders is a local directory (an hf:// model is downloaded "
        "into one), where metroline serve refuses a revision at start; remove it and write "
        "the revision into model.uri, hf://org/name@revision"
    ),
    "--config": (
        "but metroline serve would read flags from that file, which the operator cannot check "
        "(a managed flag or --drain-timeout among them); remove it and put the flags in "
        "engine.extraArgs"
    ),
}
"""Managed flags that no spec field renders, and why extraArgs may not set them."""


def why_refused(flag: str) -> str:
    """Why extraArgs may not set ``flag`` (a managed flag) and what to do instead."""
    return REFUSED_FLAGS.get(
        flag,
        "which the operator renders from the spec; remove it and use the matching spec field",
    )


ENGINE_FLAGS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (option strings, kind, choices): generated from `metroline serve`'s parser, in its order
    # (argparse names ambiguous prefixes' matches in that order); see test_engine_cli.py.
    ('-h --help', 'help', ()),
    ('--config', 'str', ()),
    ('--revision', 'str', ()),
    ('--tokenizer', 'str', ()),
    ('--trust-remote-code --no-trust-remote-code', 'bool', ()),
    ('--generation-config', 'str', ()),
    ('--tensor-parallel-size -tp', 'int', ()),
    ('--max-model-len', 'int', ()),
    ('--gpu-memory-utilization', 'float', ()),
    ('--block-size', 'int', ()),
    ('--max-num-seqs', 'int', ()),
    ('--max-num-batched-tokens', 'int', ()),
    ('--enable-prefix-caching --no-enable-prefix-caching', 'bool', ()),
    ('--kv-cache-memory-bytes', 'int', ()),
    ('--dtype', 'str', ()),
    ('--quantization -q', 'str', ('fp8',)),
    ('--kv-cache-dtype', 'str', ('auto', 'fp8', 'fp8_e4m3')),
    ('--load-format', 'str', ()),
    ('--enforce-eager --no-enforce-eager', 'bool', ()),
    ('--async-scheduling --no-async-scheduling', 'bool', ()),
    ('--mixed-step-graphs --no-mixed-step-graphs', 'bool', ()),
    ('--speculative-config', 'str', ()),
    ('--seed', 'int', ()),
    ('--device', 'str', ()),
    ('--host', 'str', ()),
    ('--port', 'int', ()),
    ('--ready-kv-threshold', 'float', ()),
    ('--ready-kv-low-watermark', 'float', ()),
    ('--ready-max-waiting', 'int', ()),
    ('--max-waiting-requests', 'int', ()),
    ('--drain-timeout', 'float', ()),
    ('--allow-unknown-fields --no-allow-unknown-fields', 'bool', ()),
    ('--chat-template', 'str', ()),
    ('--trust-request-chat-template --no-trust-request-chat-template', 'bool', ()),
    ('--enable-auto-tool-choice --no-enable-auto-tool-choice', 'bool', ()),
    ('--tool-call-parser', 'str', ('llama3_json', 'hermes', 'mistral')),
    ('--log-stats-interval', 'float', ()),
    ('--disable-log-stats --no-disable-log-stats', 'bool', ()),
    ('--allowed-origins', 'str+', ()),
    ('--allowed-methods', 'str+', ()),
    ('--allowed-headers', 'str+', ()),
    ('--allow-credentials --no-allow-credentials', 'bool', ()),
    ('--served-model-name', 'str+', ()),
    ('--api-key', 'str', ()),
    ('--log-level', 'str', ('debug', 'info', 'warning', 'error')),
    ('--log-format', 'str', ('text', 'json')),
    ('--disable-uvicorn-access-log', 'true', ()),
    ('--max-request-bytes', 'int', ()),
    ('--max-sequences-per-request', 'int', ()),
    ('--max-connections', 'int', ()),
    ('--header-timeout', 'float', ()),
    ('--keep-alive-timeout', 'float', ()),
    ('--body-timeout', 'float', ()),
    ('--send-timeout', 'float', ()),
    ('--max-preparing-bytes', 'int', ()),
)
"""Kinds: ``help``; ``int``, ``float``, ``str`` (one value), ``str+`` (one or more); ``bool``
(``--x/--no-x``, no value); ``true`` (a switch, no value)."""

UNSEEN = "\x00"
"""Marks text the operator cannot see in an argument (a ``$(VAR)`` whose variable comes from a
Secret, a ConfigMap or a field): such a value passes every type and choice, as it may."""


def managed_flags_set(extra_args: Sequence[str]) -> list[tuple[str, str]]:
    """(as written, as the engine reads it) for each arg of ``extra_args`` setting a managed
    or refused flag."""
    found = []
    for arg in extra_args:
        flag = managed_flag(arg)
        if flag is not None:
            found.append((arg.split("=", 1)[0], flag))
    return found


def managed_flags_detail(extra_args: Sequence[str]) -> str:
    """Why each managed flag ``extra_args`` sets is refused, grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for written, flag in managed_flags_set(extra_args):
        shown = written if written == flag else f"{written} (read by the engine as {flag})"
        by_reason.setdefault(why_refused(flag), []).append(shown)
    return "; ".join(
        f"spec.engine.extraArgs sets {', '.join(shown)}, {why}" for why, shown in by_reason.items()
    )


def managed_flag(arg: str) -> str | None:
    """The rendered flag that ``arg`` would set on the engine's command line, if any.

    The engine parses with argparse, which also takes a unique prefix of a long flag
    (``--tensor-parallel 4``) and refuses an ambiguous one, and reads a prefix of a
    single-dash flag (``-t`` for ``-tp``, but not ``-t=4``); either way a prefix of a rendered
    flag in extraArgs cannot work as the user meant.
    """
    flag = arg.split("=", 1)[0]
    if flag in MANAGED_FLAGS:
        return flag
    if flag.startswith("--") and len(flag) > 2:
        return next((f for f in sorted(MANAGED_FLAGS) if f.startswith(flag)), None)
    if flag == arg and len(arg) > 1 and arg[0] == "-" != arg[1]:
        return next((f for f in sorted(MANAGED_FLAGS) if f[1] != "-" and f.startswith(arg)), None)
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
    short = sorted(f.removeprefix("-") for f in MANAGED_FLAGS if not f.startswith("--"))
    return (f"^(({'|'.join(f'-{s}' for s in short)}|--({_prefix_regex(long_flags)}))(=|$)"
            f"|-({_prefix_regex(short)})$)")


# --- reading a whole command line ---------------------------------------------------------


class _Refused(Exception):
    """argparse gave up: an error, or --help (which prints and exits)."""


class _Parser(argparse.ArgumentParser):
    """Raises instead of printing and exiting; records every flag it takes (``calls``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str]] = []

    def error(self, message: str) -> NoReturn:
        raise _Refused(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _Refused(message or "--help makes metroline serve print its help and exit")

    def print_help(self, file: Any = None) -> None:
        return None


class _Recorded(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        parser.calls.append((self.option_strings[0], option_string or self.option_strings[0]))
        super().__call__(parser, namespace, values, option_string)  # type: ignore[safe-super]


class _Store(_Recorded, argparse._StoreAction):
    pass


class _Switch(_Recorded, argparse.BooleanOptionalAction):
    pass


class _True(_Recorded, argparse._StoreTrueAction):
    pass


@dataclass(frozen=True, slots=True)
class Unseen:
    """The value of an argument that holds text the operator cannot see (``UNSEEN``)."""

    text: str


class _Choices(tuple):
    def __contains__(self, value: object) -> bool:
        return isinstance(value, Unseen) or super().__contains__(value)


_SUFFIX_VALUES = {"k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
                  "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _engine_int(text: str) -> int:
    """An integer as the engine's flags read it: plain, or with vLLM's suffixes (``32k`` is
    32000, ``32K`` 32768; decimals only before a lower-case one)."""
    body, suffix = text.strip(), ""
    if body[-1:] in _SUFFIX_VALUES:
        body, suffix = body[:-1], body[-1]
    if not suffix:
        return int(body)
    if not body or not all(part.isdecimal() for part in body.split(".", 1)):
        raise ValueError(text)
    if "." in body and suffix.isupper():
        raise ValueError(text)
    scale = _SUFFIX_VALUES[suffix]
    return int(float(body) * scale) if "." in body else int(body) * scale


def _typed(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return Unseen(text) if UNSEEN in text else kind(text)

    convert.__name__ = "int" if kind is _engine_int else kind.__name__  # argparse's words
    return convert


def _options(kind: str, choices: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    if kind == "bool":
        yield "action", _Switch
    elif kind == "true":
        yield "action", _True
    else:
        yield "action", _Store
        yield "type", _typed({"int": _engine_int, "float": float}.get(kind.rstrip("+"), str))
        if kind.endswith("+"):
            yield "nargs", "+"
    if choices:
        yield "choices", _Choices(choices)


def _metroline_parser() -> tuple[_Parser, _Parser]:
    """``metroline`` with its ``serve`` sub-command, as engine/cli.py builds them."""
    top = _Parser(prog="metroline")
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")  # -h/--help first, as ENGINE_FLAGS has it
    serve.add_argument("model")
    for names, kind, choices in ENGINE_FLAGS:
        if kind != "help":
            flags = names.split()[:1] if kind == "bool" else names.split()  # it adds --no-x
            serve.add_argument(*flags, **dict(_options(kind, choices)))
    return top, serve


@dataclass(frozen=True, slots=True)
class ServeReading:
    """How ``metroline serve`` reads a command line: ``error`` (argparse's words) when it
    refuses it, else ``calls``, each flag it took in order as (its first option string, the
    string as written), and ``values`` by destination (``drain_timeout``...)."""

    error: str | None
    calls: tuple[tuple[str, str], ...]
    values: Mapping[str, Any]


def read_serve_args(args: Sequence[str]) -> ServeReading:
    """Read ``metroline serve ARGS`` (``ARGS`` starts with the model) as the engine's parser
    does; never raises, prints nothing."""
    top, serve = _metroline_parser()
    try:
        namespace = top.parse_args(["serve", *args])
    except _Refused as refused:
        return ServeReading(str(refused), tuple(serve.calls), {})
    except Exception as error:  # a bug here must not stop a reconcile
        return ServeReading(f"the operator could not read it: {error!r}", tuple(serve.calls), {})
    return ServeReading(None, tuple(serve.calls), vars(namespace))
