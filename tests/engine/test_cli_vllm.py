"""``metroline serve`` read as ``vllm serve`` is: defaults in --help, --version, --model,
human-readable integers, serve's usage for an unknown flag, $VLLM_API_KEY, --config YAML, and
a KV budget too small for one sequence refused before the HTTP server starts (exit 2)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from metroline.engine import cli
from metroline.engine.config import EngineArgs
from metroline.engine.flags import flag_values
from metroline.engine.server.args import ServerArgs


def serve_actions() -> list[argparse.Action]:
    return [a for a in cli.serve_parser(cli.build_parser())._actions if a.option_strings]


def refused(argv: list[str], capsys) -> str:
    """The error output of a command line the parser refuses with status 2."""
    with pytest.raises(SystemExit) as stop:
        cli.parse_command_line(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_help_shows_every_default():
    for action in serve_actions():
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if action.default not in (None, ()) and action.option_strings != ["--api-key"]:
            assert "default" in (action.help or ""), action.option_strings
    text = cli.serve_parser(cli.build_parser()).format_help()
    assert "(default: 8192)" in text and "(default: info)" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.parse_command_line(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("metroline ")


def test_model_as_positional_or_flag(capsys):
    for argv in (["demo", "--port", "1"], ["--port", "1", "--model", "demo"], ["--model=demo"]):
        assert cli.parse_command_line(["serve", *argv]).model == "demo"
    assert "given twice" in refused(["serve", "demo", "--model", "other"], capsys)


def test_integers_read_as_vllm_reads_them(capsys):
    ns = cli.parse_command_line(
        ["serve", "demo", "--max-model-len", "32k", "--max-num-batched-tokens", "16K",
         "--kv-cache-memory-bytes", "2G", "--max-request-bytes", "1.5m"]
    )  # fmt: skip
    assert (ns.max_model_len, ns.max_num_batched_tokens) == (32000, 16384)
    assert (ns.kv_cache_memory_bytes, ns.max_request_bytes) == (2 * 2**30, 1_500_000)
    assert "no decimals" in refused(["serve", "demo", "--max-model-len", "1.5K"], capsys)
    assert "invalid int value" in refused(["serve", "demo", "--max-num-seqs", "lots"], capsys)


def test_an_unknown_flag_prints_serves_usage(capsys):
    error = refused(["serve", "demo", "--no-such-flag", "3"], capsys)
    assert error.startswith("usage: metroline serve")
    assert "unrecognized arguments: --no-such-flag 3" in error


def test_vllm_api_key_when_metroline_api_key_is_unset(monkeypatch):
    monkeypatch.delenv("METROLINE_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert cli.parse_command_line(["serve", "demo"]).api_key == "from-vllm"
    monkeypatch.setenv("METROLINE_API_KEY", "own")
    assert cli.parse_command_line(["serve", "demo"]).api_key == "own"


def test_list_flags_take_values_or_a_json_list():
    ns = cli.parse_command_line(
        ["serve", "demo", "--allowed-origins", '["http://a.test", "http://b.test"]',
         "--allowed-methods", "GET", "POST"]
    )  # fmt: skip
    values = flag_values(ns, ServerArgs, skip=cli._SERVER_OWN_FLAGS)
    assert values["allowed_origins"] == ("http://a.test", "http://b.test")
    assert values["allowed_methods"] == ("GET", "POST")
    with pytest.raises(ValueError, match="--allowed-origins"):
        flag_values(
            cli.parse_command_line(["serve", "demo", "--allowed-origins", "[1]"]), ServerArgs
        )


def test_config_file_like_vllms(tmp_path, capsys):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "model: demo\nmax_model_len: 2k\nmax-num-seqs: 8\nenable_prefix_caching: false\n"
        "served_model_name: [a, b]\nenforce_eager: true\nlog-stats-interval: 0\n"
    )
    ns = cli.parse_command_line(["serve", "--config", str(config)])
    assert (ns.model, ns.max_model_len, ns.max_num_seqs) == ("demo", 2000, 8)
    assert ns.enable_prefix_caching is False and ns.enforce_eager is True
    assert ns.served_model_name == ["a", "b"] and ns.log_stats_interval == 0
    # The command line wins, the model included.
    ns = cli.parse_command_line(["serve", "other", "--config", str(config), "--max-num-seqs", "4"])
    assert (ns.model, ns.max_num_seqs) == ("other", 4)
    for text, words in [
        ("max_modle_len: 5\n", "'max_modle_len' is not a flag"),
        ("enforce_eager: 3\n", "takes true or false"),
        ("- a list\n", "mapping"),
        ("max_num_seqs: [1, 2]\n", "takes one value"),
        ("a: [\n", "not valid YAML"),
    ]:
        config.write_text(text)
        assert words in refused(["serve", "demo", "--config", str(config)], capsys), text


def test_a_kv_budget_below_one_sequence_is_refused_at_configuration(tiny_checkpoint):
    path = str(tiny_checkpoint("llama"))
    with pytest.raises(ValueError, match="kv_cache_memory_bytes=1000 holds 0 tokens"):
        EngineArgs(model=path, kv_cache_memory_bytes=1000, device="cpu").create_config()
    # Exactly one sequence of max_model_len fits: accepted.
    config = EngineArgs(model=path, max_model_len=64, device="cpu").create_config()
    enough = config.kv_bytes_per_block * 4
    EngineArgs(
        model=path, max_model_len=64, kv_cache_memory_bytes=enough, device="cpu"
    ).create_config()
    with pytest.raises(ValueError, match="--kv-cache-memory-bytes"):
        EngineArgs(
            model=path, max_model_len=64, kv_cache_memory_bytes=enough - 1, device="cpu"
        ).create_config()


def test_the_worker_sizes_blocks_as_the_configuration_checks_them(tiny_checkpoint):
    """One formula (EngineConfig.kv_bytes_per_block): a budget the start-up check accepts
    gives the worker exactly the blocks it counted, and they take exactly those bytes."""
    from metroline.engine.worker.worker import Worker

    path = str(tiny_checkpoint("llama"))
    probe = EngineArgs(model=path, max_model_len=64, device="cpu").create_config()
    budget = probe.kv_bytes_per_block * 4
    config = EngineArgs(
        model=path, max_model_len=64, kv_cache_memory_bytes=budget, device="cpu"
    ).create_config()
    worker = Worker(config)
    assert worker.bytes_per_block() == config.kv_bytes_per_block
    assert worker.determine_num_blocks() == 4
    worker.initialize_cache(4)
    caches = worker.key_caches + worker.value_caches
    assert sum(t.numel() * t.element_size() for t in caches) == budget
    worker.shutdown()


def test_serve_exits_2_before_the_http_server_starts(tiny_checkpoint):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("METROLINE_API_KEY", None)
    result = subprocess.run(
        [sys.executable, "-P", "-m", "metroline.engine.cli", "serve",
         str(tiny_checkpoint("llama")), "--kv-cache-memory-bytes", "1000", "--device", "cpu",
         "--port", "0"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "kv_cache_memory_bytes=1000" in result.stderr
    assert "uvicorn" not in result.stderr.lower() and "serving" not in result.stderr
