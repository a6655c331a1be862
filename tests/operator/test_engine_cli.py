"""The command lines the operator renders parse with the programs that run them: `metroline serve`
(engine/cli.py, the real argparse parser) in the engine container and `hf download` in the init
container, and the defaults the operator relies on are the engine's.

``metroline.engine.cli`` loads neither torch nor the server (its flags come from EngineArgs and
ServerArgs alone), so these tests stay as fast as the rest of tests/operator.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import io
import math
import sys
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metroline.engine.flags import human_readable_int
from metroline.operator import constants as c
from metroline.operator.checks import MANAGED_FLAGS, check_spec, managed_flag
from metroline.operator.managedflags import ENGINE_FLAGS, _metroline_parser
from metroline.operator.pod import (
    GRACE_MARGIN_S,
    MAX_DRAIN_TIMEOUT_S,
    PRE_STOP_SLEEP_S,
    download_container,
    engine_args,
    pod_spec,
)
from metroline.operator.spec import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    Readiness,
)
from metroline.operator.spec import EngineArgs as OperatorEngineArgs

from .conftest import llmd_body


@functools.cache
def cli() -> ModuleType:
    return importlib.import_module("metroline.engine.cli")


def _serve(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def serve_parser() -> argparse.ArgumentParser:
    """The `serve` sub-command's parser."""
    return _serve(cli().build_parser())


def parse(args: list[str], exact: bool = True) -> argparse.Namespace:
    """``metroline serve ARGS`` as the engine reads it; ``exact`` refuses abbreviated flags, so
    a misspelt rendered flag cannot pass as a prefix of a real one."""
    parser = cli().build_parser()
    _serve(parser).allow_abbrev = not exact
    try:
        return parser.parse_args(["serve", *args])
    except SystemExit as error:  # argparse reports unknown or malformed flags this way
        raise AssertionError(f"metroline serve refuses {args}") from error


def option_strings() -> set[str]:
    return {flag for action in serve_parser()._actions for flag in action.option_strings}


def test_every_managed_flag_and_its_aliases_exist_in_the_cli():
    missing = MANAGED_FLAGS - option_strings()
    assert not missing, sorted(missing)
    for action in serve_parser()._actions:
        if set(action.option_strings) & MANAGED_FLAGS:
            assert set(action.option_strings) <= MANAGED_FLAGS, action.option_strings


def test_no_other_engine_flag_looks_like_a_managed_one():
    """managed_flag() refuses prefixes of rendered flags; no real flag may be such a prefix."""
    for flag in option_strings() - MANAGED_FLAGS:
        assert managed_flag(flag) is None, flag


@pytest.mark.parametrize(("args", "flag"), [
    (["-tp", "1"], "-tp"), (["-t", "1"], "-tp"), (["--port=9000"], "--port"),
    (["--tensor-parallel", "1"], "--tensor-parallel-size"), (["--po", "1"], "--port"),
    (["--no-enable-prefix"], "--no-enable-prefix-caching"),
    (["--seed", "1"], None), (["--enforce-eager"], None), (["--drain-timeout=60"], None),
    (["--ready-kv-low-watermark", "0.5"], None), (["--api-key", "1"], None),
])
def test_extra_args_may_not_set_a_managed_flag_even_abbreviated(args, flag):
    assert managed_flag(args[0]) == flag
    problems = check_spec("llama", llmd_body(engine={"extraArgs": args})["spec"]).problems
    assert bool(problems) is (flag is not None), problems
    assert flag is None or flag in problems[0]


def test_the_engine_takes_abbreviated_flags():
    """Why prefixes are refused: argparse reads ``--tensor-parallel 4`` as the full flag."""
    assert parse([".", "--tensor-parallel", "4"], exact=False).tensor_parallel_size == 4


def test_the_operator_shares_the_engine_defaults():
    """The operator's defaults are EngineArgs' and ServerArgs' (the flags' defaults come
    from them too)."""
    from metroline.engine.config import SERVING_DEFAULTS, EngineArgs
    from metroline.engine.server.args import ServerArgs

    engine = {f.name: f.default for f in dataclasses.fields(EngineArgs)}
    server = {f.name: f.default for f in dataclasses.fields(ServerArgs)}
    assert engine["max_num_seqs"] == DEFAULT_MAX_NUM_SEQS  # used by the CEL rule
    # metroline serve's own default (the operator runs the server).
    assert SERVING_DEFAULTS["max_num_batched_tokens"] == DEFAULT_MAX_NUM_BATCHED_TOKENS
    assert engine["enable_prefix_caching"] == OperatorEngineArgs().enable_prefix_caching
    assert server["ready_kv_threshold"] == Readiness().kv_cache_threshold
    assert server["drain_timeout"] == c.ENGINE_DRAIN_TIMEOUT_S
    assert server["port"] == c.HTTP_PORT
    defaults = {a.dest: a.default for a in serve_parser()._actions}
    assert defaults["max_num_seqs"] == DEFAULT_MAX_NUM_SEQS  # used by the CEL rule
    assert defaults["max_num_batched_tokens"] == DEFAULT_MAX_NUM_BATCHED_TOKENS
    assert defaults["ready_kv_threshold"] == Readiness().kv_cache_threshold
    assert defaults["drain_timeout"] == c.ENGINE_DRAIN_TIMEOUT_S  # sizes the grace period
    assert defaults["port"] == c.HTTP_PORT


ENGINE = st.fixed_dictionaries({}, optional={
    "tensorParallelSize": st.sampled_from([1, 2, 4, 8]),
    "maxModelLen": st.integers(16, 1_048_576),
    "gpuMemoryUtilization": st.floats(0.01, 1.0),
    "maxNumSeqs": st.integers(1, 8192),
    "maxNumBatchedTokens": st.integers(8192, 1_048_576),
    "blockSize": st.sampled_from([8, 16, 32]),
    "dtype": st.sampled_from(["auto", "float16", "bfloat16", "float32"]),
    "enablePrefixCaching": st.booleans(),
    "extraArgs": st.sampled_from([[], ["--enforce-eager"], ["--api-key", "$(API_KEY)"],
                                  ["--drain-timeout=60", "--log-format", "json"]]),
})


@settings(max_examples=80, deadline=None)
@given(
    engine=ENGINE, threshold=st.floats(0.01, 1.0), served=st.none() | st.just("chat"),
    uri=st.sampled_from(["hf://org/model@v1", "pvc://claim/dir", "/models/m"]),
)
def test_rendered_command_line_parses_to_the_spec(engine, threshold, served, uri):
    model: dict[str, Any] = {"uri": uri, **({"servedName": served} if served else {})}
    check = check_spec("llama", llmd_body(
        model=model, engine=engine, readiness={"kvCacheThreshold": threshold},
    )["spec"])
    assert check.spec is not None and check.location is not None, check.problems
    args = engine_args(check.spec, check.location)
    rendered = args[:len(args) - len(check.spec.engine.extra_args)]
    assert {arg for arg in rendered if arg.startswith("-")} <= MANAGED_FLAGS
    spec, parsed = check.spec.engine, parse(args)
    assert parsed.model == check.location.local_path
    assert parsed.served_model_name == [served or check.location.default_served_name]
    assert (parsed.host, parsed.port) == ("0.0.0.0", c.HTTP_PORT)
    assert parsed.tensor_parallel_size == spec.tensor_parallel_size
    assert parsed.ready_kv_threshold == threshold
    assert parsed.enable_prefix_caching is spec.enable_prefix_caching
    for field in ("max_model_len", "gpu_memory_utilization", "max_num_seqs",
                  "max_num_batched_tokens", "block_size", "dtype"):
        if getattr(spec, field) is not None:
            assert getattr(parsed, field) == getattr(spec, field), field


def engine_flag_table() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """``managedflags.ENGINE_FLAGS`` as the engine's serve parser has it now."""
    rows = []
    for action in serve_parser()._actions:
        if not action.option_strings:
            continue
        assert not action.required and action.const in (None, True), action
        if isinstance(action, argparse._HelpAction):
            kind = "help"
        elif isinstance(action, argparse.BooleanOptionalAction):
            kind = "bool"
        elif isinstance(action, argparse._StoreTrueAction):
            kind = "true"
        else:
            assert type(action) is argparse._StoreAction and action.nargs in (None, "+"), action
            # Integer flags take vLLM's human-readable integers (32k, 32K).
            kind = {human_readable_int: "int", float: "float", None: "str"}[action.type]
            kind += "+" if action.nargs == "+" else ""
        rows.append((" ".join(action.option_strings), kind, tuple(action.choices or ())))
    return tuple(rows)


def test_the_operator_reads_with_the_engines_flag_table():
    """The operator's copy of the flag table (it may not import the engine) is the engine's;
    on drift, paste the printed table into operator/managedflags.py."""
    table = engine_flag_table()
    now = "\n".join(f"    {row!r}," for row in table)
    assert table == ENGINE_FLAGS, f"ENGINE_FLAGS drifted from metroline serve; now:\n{now}"
    real, (top, mirror) = serve_parser(), _metroline_parser()
    assert [(a.dest, a.option_strings) for a in mirror._actions] == [
        (a.dest, a.option_strings) for a in real._actions]
    assert [a.dest for a in real._actions if not a.option_strings] == ["model"]
    for setting in ("allow_abbrev", "prefix_chars", "fromfile_prefix_chars"):
        assert getattr(mirror, setting) == getattr(real, setting), setting
        assert getattr(top, setting) == getattr(cli().build_parser(), setting), setting


ENV = [{"name": "N", "value": "4"}, {"name": "NEG", "value": "-5"},
       {"name": "LVL", "value": "debug"}]
AS_RUN = {
    "$(N)": "4", "$(NEG)": "-5", "$(LVL)": "debug", "$$(N)": "$(N)", "$(NOPE)": "$(NOPE)",
    "--seed=$(N)": "--seed=4", "--drain-timeout=$(NEG)": "--drain-timeout=-5", "-tp$(N)": "-tp4",
}
"""Arguments with ``$(VAR)`` references to ``ENV``, as the kubelet expands them."""
CURATED = [
    "-tp4", "-tp=4", "-t", "-t4", "-t=4", "--tensor", "--tensor=2", "--drain", "--drain=5",
    "--de", "--d", "--max-num", "--max-num-s", "--h", "--he", "--no-enable", "--enforce",
    "--enforce-eager=1", "--no-enforce", "--seed=1", "--seed=-1", "--api-key=--port",
    "--api-key=-x", "--log-level=json", "--log-l", "--log-format=json", "--served",
    "--drain-timeout=1e308", "--drain-timeout=-1", "--drain-timeout=nan", "--drain-timeout=3600",
    "--drain-timeout=3601", "--disable-uvicorn-access-log=1", "--", "-", "-x", "-x y", "--x y",
    "a b", "", "1", "-1", "-1.5", "-1e5", "0.5", "4", "1e308", "inf", "nan", "json", "debug",
    "text", "x", "--port\n", "4k", "4K", "1.5k", "1.5K", "--seed=2k", "--seed=1.5M", *AS_RUN,
]


def real_reading(args: list[str]) -> tuple[argparse.Namespace | None, int]:
    """``metroline serve ARGS`` read by the engine's own parser: the namespace (None where it
    exits, --help included) and how many times a managed flag was taken."""
    parser = cli().build_parser()
    calls: list[str] = []
    for action in _serve(parser)._actions:
        if set(action.option_strings) & MANAGED_FLAGS:
            base = type(action)

            def call(self, p, ns, values, option=None, base=base):
                calls.append(option)
                base.__call__(self, p, ns, values, option)

            action.__class__ = type("Recorded", (base,), {"__call__": call})
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return parser.parse_args(["serve", *args]), len(calls)
        except SystemExit:
            return None, len(calls)


@settings(max_examples=400, deadline=None)
@given(extra=st.lists(st.sampled_from(sorted(option_strings())) | st.sampled_from(CURATED),
                      max_size=5))
def test_the_operator_accepts_exactly_what_metroline_serve_accepts(extra):
    """extraArgs pass check_spec exactly when the engine's parser takes the whole command line
    (after $(VAR) expansion) without a managed flag, and with a drain timeout the grace period
    can cover; the grace period then covers the drain the engine reads."""
    base = check_spec("llama", llmd_body(env=ENV)["spec"])
    assert base.spec is not None and base.location is not None
    rendered = engine_args(base.spec, base.location)
    full, managed_by_render = real_reading(rendered)
    assert full is not None
    parsed, managed = real_reading(rendered + [AS_RUN.get(arg, arg) for arg in extra])
    accepted = (parsed is not None and managed == managed_by_render
                and 0 <= parsed.drain_timeout <= MAX_DRAIN_TIMEOUT_S)
    check = check_spec("llama", llmd_body(env=ENV, engine={"tensorParallelSize": 2,
                                                            "extraArgs": extra})["spec"])
    assert check.valid is accepted, (extra, check.problems)
    if accepted:
        assert check.spec is not None and check.location is not None
        grace = pod_spec(check.spec, check.location, "e:1")["terminationGracePeriodSeconds"]
        assert grace == PRE_STOP_SLEEP_S + math.ceil(parsed.drain_timeout) + GRACE_MARGIN_S


def test_download_command_parses_with_the_hf_cli(monkeypatch):
    download = pytest.importorskip("huggingface_hub.cli.download")
    hf = pytest.importorskip("huggingface_hub.cli.hf")
    if not hasattr(download, "snapshot_download"):
        pytest.skip("this huggingface_hub lays out its CLI differently")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_UPDATE_CHECK", True, raising=False)  # offline
    check = check_spec("llama", llmd_body(model={"uri": "hf://meta-llama/Llama-2-7b-hf@abc"})[
        "spec"])
    assert check.spec is not None and check.location is not None
    init = download_container(check.spec, check.location, "registry.test/engine:1")
    assert init is not None and init["command"][:2] == ["hf", "download"]
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(download, "snapshot_download", lambda **kw: calls.append(kw) or "/x")
    monkeypatch.setattr(sys, "argv", init["command"])
    with pytest.raises(SystemExit) as done:
        hf.main()
    assert done.value.code in (0, None)
    (call,) = calls
    assert call["repo_id"] == "meta-llama/Llama-2-7b-hf" and call["revision"] == "abc"
    assert call["local_dir"] == check.location.local_path
    assert "*.bin" in call["ignore_patterns"] and "original/*" in call["ignore_patterns"]
