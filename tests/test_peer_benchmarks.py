"""The vLLM peer tooling (benchmarks/peer_*.py) on the CPU: the tokenizer round-trips every
id, vLLM's arguments are the workload's plus the overrides, the W6 commands carry
BENCHMARKS' flags, and the peer table computes its medians and ratios from real records."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import peer_serve  # noqa: E402
import peer_table  # noqa: E402
from peer_tokenizer import write_word_level_tokenizer  # noqa: E402
from peer_vllm import parse_overrides, vllm_engine_kwargs  # noqa: E402
from roofline import decode_seconds  # noqa: E402


def test_the_word_level_tokenizer_round_trips_random_ids(tmp_path):
    from transformers import AutoTokenizer

    write_word_level_tokenizer(tmp_path, 5000)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = [random.Random(0).randrange(5000) for _ in range(300)]
    assert len(tokenizer) == 5000
    assert tokenizer(tokenizer.decode(ids))["input_ids"] == ids


def test_vllm_arguments_are_the_workloads_plus_overrides(tmp_path):
    args = argparse.Namespace(
        dtype="bfloat16", max_model_len=4096, tensor_parallel_size=1,
        vllm_arg=["max_num_seqs=256", "enforce_eager=true", "kv_cache_dtype=auto"],
    )  # fmt: skip
    kwargs = vllm_engine_kwargs(tmp_path, args)
    assert kwargs["load_format"] == "dummy" and kwargs["enable_prefix_caching"] is True
    assert kwargs["max_num_seqs"] == 256 and kwargs["enforce_eager"] is True
    assert kwargs["kv_cache_dtype"] == "auto"
    assert "max_num_batched_tokens" not in kwargs  # vLLM's own default unless asked
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["max_num_seqs"])
    args.quantization, args.kv_cache_dtype, args.vllm_arg = "fp8", "fp8", []
    fp8 = vllm_engine_kwargs(tmp_path, args)
    assert fp8["quantization"] == "fp8" and fp8["kv_cache_dtype"] == "fp8"


def test_w6_commands_carry_the_documented_flags(tmp_path):
    bench = peer_serve.bench_command(8000, "m", tmp_path, "30", 600, 2, tmp_path / "r.json")
    text = " ".join(bench)
    for flag in (
        "--backend openai", "--endpoint /v1/completions", "--dataset-name random",
        "--random-input-len 1024", "--random-output-len 128", "--num-prompts 600",
        "--temperature 0", "--ignore-eos", "--request-rate 30", "--seed 2",
    ):  # fmt: skip
        assert flag in text
    ours = peer_serve.server_command("metroline", tmp_path, "m", 8000, "--max-num-seqs 512")
    theirs = peer_serve.server_command("vllm", tmp_path, "m", 8000, "")
    for command in (ours, theirs):
        assert "--load-format dummy --dtype bfloat16 --max-model-len 4096" in " ".join(command)
    assert ours[-2:] == ["--max-num-seqs", "512"] and "metroline.engine.cli" in ours


def test_decode_roofline_is_bounded_by_matmuls_at_large_batches():
    prompts, outputs = [512] * 1000, [256] * 1000
    slow_matmuls = decode_seconds("llama3-8b", prompts, outputs, 1000, 4e12, 1e12)
    fast_matmuls = decode_seconds("llama3-8b", prompts, outputs, 1000, 4e12, 1e18)
    assert slow_matmuls > fast_matmuls  # compute-bound at batch 1000 with a slow matmul rate
    assert decode_seconds("llama3-8b", prompts, outputs, 1, 4e12, 7.7e14) == pytest.approx(
        decode_seconds("llama3-8b", prompts, outputs, 1, 4e12, 1e18)
    )  # at an H200's matmul rate, reads bound batch 1


def _throughput(backend: str, tok_s: float, vllm_arg=None, gpu="NVIDIA H200", fp8=False) -> dict:
    record = {
        "benchmark": "throughput",
        "environment": {"gpu": gpu, "commit": "abc123", "torch": "2.11", "triton": "3.6"}
        | ({"vllm": "0.26.0"} if backend == "vllm" else {}),
        "parameters": {"model": "llama3-8b", "vllm_arg": vllm_arg, "max_num_seqs": 1024,
                       "max_num_batched_tokens": 16384},
        "workload": {"name": "W1"},
        backend: {"output_tokens_per_s": tok_s, "roofline": {"fraction_achieved": 0.7}}
        | ({"settings": {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}}
           if backend == "vllm" else {}),
    }  # fmt: skip
    if fp8:
        record["parameters"] |= {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    return record


def test_the_peer_table_takes_medians_and_ratios(tmp_path, capsys):
    records = [
        _throughput("metroline", 10_000), _throughput("metroline", 10_400),
        _throughput("metroline", 10_200), _throughput("vllm", 9_900), _throughput("vllm", 10_100),
        _throughput("vllm", 9_000, vllm_arg=["max_num_seqs=256"]),
        _throughput("metroline", 15_300, fp8=True), _throughput("vllm", 13_000, fp8=True),
        {"benchmark": "serve-W6", "gpu": "NVIDIA H200", "vllm_version": "0.26.0",
         "metroline": {"rows": [{"rate": "30", "mean_ttft_ms": 90.0, "mean_tpot_ms": 20.0,
                                 "output_throughput": 3000.0}], "start_to_serving_s": 12.0},
         "vllm": {"rows": [{"rate": "30", "mean_ttft_ms": 100.0, "mean_tpot_ms": 25.0,
                            "output_throughput": 2900.0}], "start_to_serving_s": 40.0}},
    ]  # fmt: skip
    for i, record in enumerate(records):
        (tmp_path / f"r{i}.json").write_text(json.dumps(record))
    peer = peer_table.build(peer_table.load_records(tmp_path))
    assert peer["W1"]["metroline"]["median_output_tokens_per_s"] == 10_200
    assert peer["W1"]["metroline_over_vllm"] == pytest.approx(10_200 / 10_000)
    assert peer["W1"]["metroline_over_vllm_equal"] == pytest.approx(10_200 / 9_000)
    assert peer["W1"]["metroline_fp8_over_vllm_fp8"] == pytest.approx(15_300 / 13_000)
    assert peer["W1"]["metroline_fp8_over_metroline"] == pytest.approx(15_300 / 10_200)
    assert peer["versions"]["vllm"] == "0.26.0" and peer["gpu"] == "NVIDIA H200"
    peer_table.print_table(peer)
    printed = capsys.readouterr().out
    assert "0.90x" in printed and "0.80x" in printed  # TTFT and TPOT ratios at rate 30
    (tmp_path / "other.json").write_text(json.dumps(_throughput("vllm", 1, gpu="NVIDIA H100")))
    with pytest.raises(SystemExit, match="2 cards"):
        peer_table.build(peer_table.load_records(tmp_path))


def test_a_repeated_run_never_replaces_an_earlier_record(tmp_path):
    from records import save_record

    first = save_record(tmp_path, ["h200", "W1"], {"run": 1})
    second = save_record(tmp_path, ["h200", "W1"], {"run": 2})
    assert first != second and second.name.endswith("-W1-2.json")
    assert json.loads(first.read_text()) == {"run": 1}


def test_the_gpu_timeline_counts_overlaps_once_and_ranks_gaps():
    from stall_diagnostics import timeline_summary

    us = 1000
    intervals = [
        (0, 100 * us, "gemm"),
        (50 * us, 120 * us, "attention"),  # overlaps the GEMM: busy counted once
        (60 * us, 70 * us, "norm"),  # inside both: adds nothing
        (420 * us, 500 * us, "embedding"),  # 300 us idle after the attention
        (505 * us, 600 * us, "gemm"),  # 5 us: below the gap threshold, still idle
        (700 * us, 800 * us, "embedding"),  # 100 us idle after a GEMM
        (1100 * us, 1200 * us, "embedding"),  # the same pair as before, but after embedding
    ]
    summary = timeline_summary(intervals)
    assert summary["kernels"] == 7
    assert summary["span_s"] == pytest.approx(1200e-6)
    assert summary["busy_s"] == pytest.approx((120 + 80 + 95 + 100 + 100) * 1e-6)
    assert summary["idle_s"] == pytest.approx((300 + 5 + 100 + 300) * 1e-6)
    assert summary["idle_in_gaps_s"] == pytest.approx(700e-6)
    # 60 us twentieths; gaps 120-420, 500-505, 600-700 and 800-1100 us, split over bins.
    by_time = summary["idle_fraction_by_time"]
    assert sum(by_time) * 60e-6 == pytest.approx(summary["idle_s"], rel=1e-3)
    assert max(by_time) <= 1.0
    assert by_time[2:7] == [1.0] * 5 and by_time[1] == 0.0 and by_time[7] == 0.0
    assert by_time[8] == pytest.approx(5 / 60, abs=1e-4) and by_time[10] == pytest.approx(1.0)
    assert by_time[11] == pytest.approx(40 / 60, abs=1e-4)
    assert by_time[13] == pytest.approx(40 / 60, abs=1e-4)
    assert by_time[14:18] == [1.0] * 4 and by_time[18] == pytest.approx(20 / 60, abs=1e-4)
    assert timeline_summary([(5, 5, "empty")])["span_s"] == 0.0  # no division by zero
    pairs = [(g["before"], g["after"], g["count"]) for g in summary["gaps"]]
    assert pairs == [
        ("attention", "embedding", 1),
        ("embedding", "embedding", 1),
        ("gemm", "embedding", 1),
    ]
    assert timeline_summary([])["kernels"] == 0
