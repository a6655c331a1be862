"""W6 - vLLM's own load generator against ``metroline serve`` and ``vllm serve`` in turn.

``python -P benchmarks/peer_serve.py --model llama3-8b --rates 10,20,30,inf --out DIR``

For each engine: start its server on the shape (dummy weights, bf16, max_model_len 4096, a
WordLevel tokenizer of the model's vocabulary, see :mod:`peer_tokenizer`), time the start to
serving (Metroline's ``/ready``: its ``/health`` answers while the model loads; vLLM's
``/health``), warm up on other prompts, then run ``vllm bench serve`` (random 1024/128,
greedy, ignore_eos) at each rate on fresh prompts (seeded by the rate's index, so no rate is
served from another's prefix cache), and optionally W5's W1-length load (``--w1-rates``,
:mod:`serve`'s client). The server is stopped before the next engine starts. One JSON record
holds both engines' rows with the vLLM version and the card; a table is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gpu_slug
from peer_tokenizer import write_word_level_tokenizer
from records import save_record
from serve import free_port, run_rate, stop_server
from shapes import SHAPES, write_shape
from sse_client import get_status
from workloads import make_workload

ENGINES = ("metroline", "vllm")
#: The figures of a ``vllm bench serve`` result file that the record keeps.
KEPT = ("completed", "failed", "duration", "request_throughput", "output_throughput")
SERVE_READY_TIMEOUT_S = 900


def server_command(engine: str, shape_dir: Path, model: str, port: int, extra: str) -> list[str]:
    common = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096"]
    common += ["--port", str(port), "--served-model-name", model]
    if engine == "metroline":
        head = [sys.executable, "-P", "-m", "metroline.engine.cli", "serve", str(shape_dir)]
        return head + common + ["--disable-uvicorn-access-log", *extra.split()]
    head = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(shape_dir)]
    return head + common + ["--enable-prefix-caching", *extra.split()]


def bench_command(
    port: int, model: str, shape_dir: Path, rate: str, prompts: int, seed: int, out: Path
) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
        "--backend", "openai", "--endpoint", "/v1/completions",
        "--base-url", f"http://127.0.0.1:{port}", "--model", model, "--tokenizer", str(shape_dir),
        "--dataset-name", "random", "--random-input-len", "1024", "--random-output-len", "128",
        "--num-prompts", str(prompts), "--temperature", "0", "--ignore-eos",
        "--request-rate", rate, "--seed", str(seed), "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
    ]  # fmt: skip


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The kept counters plus every mean/median/percentile of TTFT, TPOT, ITL and E2E."""
    row = {key: result[key] for key in KEPT if key in result}
    for key, value in result.items():
        if key.endswith("_ms") and isinstance(value, int | float):
            row[key] = value
    return row


def wait_until_serving(server: subprocess.Popen, port: int, engine: str, log: Path) -> float:
    path = "/ready" if engine == "metroline" else "/health"
    started = time.monotonic()
    while asyncio.run(get_status("127.0.0.1", port, path)) != 200:
        if server.poll() is not None:
            raise RuntimeError(f"{engine} server exited with {server.returncode}; log: {log}")
        if time.monotonic() - started > SERVE_READY_TIMEOUT_S:
            raise RuntimeError(f"{engine} server not serving after {SERVE_READY_TIMEOUT_S} s")
        time.sleep(0.25)
    return time.monotonic() - started


def run_engine(
    engine: str, shape_dir: Path, args: argparse.Namespace, result: dict[str, Any]
) -> None:
    """Fill ``result`` as the run goes: rows measured before an interruption are kept."""
    port = free_port()
    env = os.environ.copy()
    path = args.vllm_pythonpath if engine == "vllm" else args.metroline_pythonpath
    if path:
        env["PYTHONPATH"] = path
    extra = args.vllm_server_args if engine == "vllm" else args.metroline_server_args
    log = args.out / f"W6-{engine}-server.log"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "w") as server_log:
        server = subprocess.Popen(
            server_command(engine, shape_dir, args.model, port, extra),
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
        )
    try:
        result["start_to_serving_s"] = wait_until_serving(server, port, engine, log)
        result["spawn_to_serving_s"] = time.monotonic() - started
        bench_env = os.environ.copy() | {"PYTHONPATH": args.vllm_pythonpath or ""}
        runs = [("warm-up", "inf", 32, 1000)] + [
            (rate, rate, args.inf_prompts if rate == "inf" else args.num_prompts, index)
            for index, rate in enumerate(args.rates.split(","))
        ]
        for label, rate, prompts, seed in runs:
            out = args.out / f"W6-{engine}-rate-{rate}-{seed}.json"
            command = bench_command(port, args.model, shape_dir, rate, prompts, seed, out)
            done = subprocess.run(command, env=bench_env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"vllm bench serve failed: {done.stderr[-3000:]}")
            if label != "warm-up":
                row = summarise(json.loads(out.read_text())) | {"rate": rate}
                result["rows"].append(row)
                print(f"{engine} rate {rate}: {json.dumps(row)}", flush=True)
        vocab = SHAPES[args.model]["vocab_size"]
        for index, rate in enumerate(float(r) for r in args.w1_rates.split(",") if r):
            workload = make_workload("W1", vocab, args.num_prompts, seed=100 + index)
            row = asyncio.run(
                run_rate(
                    "127.0.0.1", port, args.model, rate, workload.prompts,
                    workload.output_lens, seed=100 + index,
                )
            )  # fmt: skip
            row.pop("per_request")
            result["w1_rows"].append(row)
    finally:
        stop_server(server)


def print_table(record: dict[str, Any]) -> None:
    print(f"\nW6 (vllm bench serve, random 1024/128) on {record['model']}, {record['gpu']}")
    print(
        f"{'engine':10s} {'rate':>5s} {'TTFT mean':>10s} {'p99':>8s} {'TPOT mean':>10s} "
        f"{'p99':>7s} {'ITL p99':>8s} {'out tok/s':>10s} {'failed':>7s}"
    )
    for engine in ENGINES:
        for r in record.get(engine, {}).get("rows", []):
            print(
                f"{engine:10s} {r['rate']:>5s} {r.get('mean_ttft_ms', 0):10.1f} "
                f"{r.get('p99_ttft_ms', 0):8.1f} {r.get('mean_tpot_ms', 0):10.2f} "
                f"{r.get('p99_tpot_ms', 0):7.2f} {r.get('p99_itl_ms', 0):8.1f} "
                f"{r.get('output_throughput', 0):10.0f} {r.get('failed', 0):7d}"
            )
    for engine in ENGINES:
        if "start_to_serving_s" in record.get(engine, {}):
            print(f"{engine}: start to serving {record[engine]['start_to_serving_s']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--rates", default="10,20,30,inf")
    parser.add_argument("--num-prompts", type=int, default=600)
    parser.add_argument("--inf-prompts", type=int, default=1000)
    parser.add_argument("--w1-rates", default="", help="also W5's W1-length load at these rates")
    parser.add_argument("--metroline-server-args", default="")
    parser.add_argument("--vllm-server-args", default="")
    parser.add_argument("--metroline-pythonpath", default="/tmp/site")
    parser.add_argument("--vllm-pythonpath", default="/tmp/vsite:/tmp/site")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    engines = args.engines.split(",")
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; known: {', '.join(ENGINES)}")
    record: dict[str, Any] = {"benchmark": "serve-W6", "model": args.model, "gpu": _gpu()}
    record["parameters"] = vars(args) | {"out": str(args.out)}
    with tempfile.TemporaryDirectory() as tmp:
        shape_dir = write_shape(args.model, Path(tmp) / args.model)
        write_word_level_tokenizer(shape_dir, SHAPES[args.model]["vocab_size"])
        for engine in engines:
            record[engine] = result = {"rows": [], "w1_rows": []}
            try:
                run_engine(engine, shape_dir, args, result)
            except RuntimeError as exc:
                result["error"] = str(exc)
                print(f"{engine}: {exc}", flush=True)
            except KeyboardInterrupt:  # the suite's time budget: keep what was measured
                result["error"] = "interrupted by the time budget"
                break
    record["vllm_version"] = _vllm_version(args.vllm_pythonpath)
    save_record(args.out, [gpu_slug(record["gpu"]), "W6", args.model], record)
    print_table(record)


def _gpu() -> str:
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    ) if _has("nvidia-smi") else None  # fmt: skip
    return done.stdout.strip().splitlines()[0] if done and done.stdout.strip() else "cpu"


def _has(program: str) -> bool:
    return any((Path(d) / program).exists() for d in os.environ.get("PATH", "").split(":"))


def _vllm_version(pythonpath: str) -> str | None:
    env = os.environ.copy() | {"PYTHONPATH": pythonpath}
    done = subprocess.run(
        [sys.executable, "-c", "import vllm; print(vllm.__version__)"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout.strip() or None


if __name__ == "__main__":
    main()
