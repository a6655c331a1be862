"""W5 - online serving (benchmarks/README.md): `metroline serve` under Poisson arrivals.

``python -P benchmarks/serve.py --model llama3-8b --rates 1,2,4,8,16 --num-requests 200``

Starts the server on a free port with synthetic weights (or uses ``--url``), then for each
request rate sends W1-shaped requests (prompt 64-1024 tokens, output 64-512, ignore_eos,
greedy) as streaming completions with exponential inter-arrival times. Reports TTFT, TPOT
and inter-token latency (p50/p90/p99), throughput, and the rate at which p99 TTFT passes 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import save_record
from shapes import SHAPES, write_shape
from sse_client import get_status, stream_completion
from workloads import make_workload

TTFT_LIMIT_S = 2.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then SIGKILL if it is still there after 120 s."""
    server.terminate()
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_rate(
    host: str, port: int, model: str, rate: float, prompts, output_lens, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    tasks = []
    started = time.perf_counter()
    for prompt, max_tokens in zip(prompts, output_lens):
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        tasks.append(asyncio.create_task(stream_completion(host, port, body)))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    ok = [r for r in results if r.error is None and r.event_times]
    ttft = [r.event_times[0] - r.sent_at for r in ok]
    tpot = [
        (r.event_times[-1] - r.event_times[0]) / (len(r.event_times) - 1)
        for r in ok
        if len(r.event_times) > 1
    ]
    itl = [b - a for r in ok for a, b in zip(r.event_times, r.event_times[1:])]
    output_tokens = sum(r.num_tokens for r in ok)
    # Per request: when it was sent (s from the first), time to first token, prompt length,
    # tokens streamed, the server's id. Kept so that a tail can be traced to its requests.
    per_request = [
        [
            round(r.sent_at - started, 4),
            round(r.event_times[0] - r.sent_at, 4) if r.event_times else None,
            len(prompt),
            r.num_tokens,
            r.response_id,
        ]
        for r, prompt in zip(results, prompts)
    ]
    row: dict[str, Any] = {
        "rate": rate,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "elapsed_s": elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "requests_per_s": len(ok) / elapsed,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_s"] = percentile(values, q)
        row[f"{name}_mean_s"] = statistics.mean(values) if values else float("nan")
    row["per_request"] = per_request
    if len(results) != len(ok):
        row["first_error"] = next(
            (r.error for r in results if r.error is not None), "a stream carried no tokens"
        )
    return row


def server_timings(log_path: Path) -> dict[str, tuple[float | None, float | None]]:
    """Response id -> (server-side TTFT, queue time) from the server's JSON request log."""
    timings = {}
    for line in log_path.read_text().splitlines():
        if '"request finished"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        timings[entry.get("request_id")] = (entry.get("ttft_s"), entry.get("queue_s"))
    return timings


def add_server_side(row: dict[str, Any], timings: dict) -> None:
    """Server-side TTFT and queue-time percentiles of the row's requests: a client-side tail
    that the server does not see lies in the network or the client, not the engine."""
    matched = [timings[r[4]] for r in row["per_request"] if r[4] in timings]
    row["server_matched"] = len(matched)
    for name, values in (
        ("server_ttft", [t for t, _ in matched if t is not None]),
        ("server_queue", [q for _, q in matched if q is not None]),
    ):
        for q in (50, 99):
            row[f"{name}_p{q}_s"] = percentile(values, q)


def rate_at_ttft_limit(rows: list[dict[str, Any]]) -> float | None:
    """Linear interpolation of the rate where p99 TTFT crosses the limit."""
    for before, after in itertools.pairwise(rows):
        if before["ttft_p99_s"] <= TTFT_LIMIT_S < after["ttft_p99_s"]:
            span = after["ttft_p99_s"] - before["ttft_p99_s"]
            return before["rate"] + (TTFT_LIMIT_S - before["ttft_p99_s"]) / span * (
                after["rate"] - before["rate"]
            )
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--rates", default="1,2,4,8,16")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=0.0,
        help="send for at least this long at each rate (more requests at high rates), so a "
        "rate above capacity builds a queue instead of a burst the running slots absorb",
    )
    parser.add_argument("--url", default=None, help="an already running server")
    parser.add_argument("--server-args", default="", help="extra `metroline serve` flags")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    vocab = SHAPES[args.model]["vocab_size"]
    warm_up = make_workload("W1", vocab, 8, seed=0)
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            host, port = args.url.split("//")[-1].split(":")
            port = int(port.split("/")[0])
        else:
            host, port = "127.0.0.1", free_port()
            path = write_shape(args.model, Path(tmp) / args.model)
            command = [
                sys.executable,
                "-P",
                "-m",
                "metroline.engine.cli",
                "serve",
                str(path),
                "--load-format",
                "dummy",
                "--port",
                str(port),
                "--max-model-len",
                str(min(4096, SHAPES[args.model]["max_position_embeddings"])),
                "--served-model-name",
                args.model,
                "--disable-uvicorn-access-log",
                "--log-format",
                "json",
                *args.server_args.split(),
            ]
            # The server's log (one JSON line per finished request: server-side TTFT and
            # queue time) goes to a file beside the results.
            args.out.mkdir(parents=True, exist_ok=True)
            log_path = args.out / f"W5-{args.model}-server.log"
            with open(log_path, "w") as server_log:
                server = subprocess.Popen(
                    command, env=os.environ.copy(), stdout=server_log, stderr=subprocess.STDOUT
                )  # the child keeps its own copy of the file; ours closes here
        rows: list[dict[str, Any]] = []
        try:
            deadline = time.monotonic() + 600
            while asyncio.run(get_status(host, port, "/ready")) != 200:
                if server is not None and server.poll() is not None:
                    raise SystemExit(
                        f"server exited with {server.returncode}; its log: {log_path}"
                    )
                if time.monotonic() > deadline:
                    raise SystemExit("server not ready after 600 s")
                time.sleep(1)
            asyncio.run(
                run_rate(host, port, args.model, 100.0, warm_up.prompts, [16] * 8, seed=0)
            )  # warm-up
            for index, rate in enumerate(rates):
                # Fresh prompts at every rate: the prefix cache must not serve one rate's
                # prompts from another's.
                count = max(args.num_requests, math.ceil(rate * args.min_seconds))
                workload = make_workload("W1", vocab, count, seed=index + 1)
                row = asyncio.run(
                    run_rate(
                        host,
                        port,
                        args.model,
                        rate,
                        workload.prompts,
                        workload.output_lens,
                        seed=index + 1,
                    )
                )
                rows.append(row)
                slowest = sorted(
                    (r[:4] for r in row["per_request"] if r[1] is not None), key=lambda r: -r[1]
                )[:5]
                print(
                    "  slowest first tokens (sent at s, TTFT s, prompt, tokens):",
                    slowest,
                    flush=True,
                )
                print(
                    f"rate {rate:6.2f}/s: TTFT p50 {row['ttft_p50_s']:.3f} s p99 "
                    f"{row['ttft_p99_s']:.3f} s, TPOT p50 {row['tpot_p50_s'] * 1e3:.1f} ms, "
                    f"{row['output_tokens_per_s']:.0f} out tok/s, errors {row['errors']}",
                    flush=True,
                )
        finally:
            if server is not None:
                stop_server(server)
                timings = server_timings(log_path)
                for row in rows:
                    add_server_side(row, timings)
    knee = rate_at_ttft_limit(rows)
    record = {
        "benchmark": "serve-W5",
        "model": args.model,
        "rates": rates,
        "num_requests": args.num_requests,
        "min_seconds": args.min_seconds,
        "rows": rows,
        "rate_where_p99_ttft_passes_2s": knee,
    }
    try:
        import torch

        record["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        record["gpu"] = "unknown"
    save_record(args.out, ["W5", args.model], record)
    print(
        f"\nW5 on {args.model} ({record['gpu']}), at least {args.num_requests} requests and "
        f"{args.min_seconds:.0f} s per rate"
    )
    print(
        f"{'rate':>6s} {'TTFT p50':>9s} {'p90':>7s} {'p99':>7s} {'TPOT p50':>9s} {'p99':>7s} "
        f"{'ITL p99':>8s} {'out tok/s':>10s} {'server TTFT p99':>16s} {'queue p99':>10s}"
    )
    for r in rows:
        print(
            f"{r['rate']:6.2f} {r['ttft_p50_s']:9.3f} {r['ttft_p90_s']:7.3f} "
            f"{r['ttft_p99_s']:7.3f} {r['tpot_p50_s'] * 1e3:8.1f}m {r['tpot_p99_s'] * 1e3:6.1f}m "
            f"{r['itl_p99_s'] * 1e3:7.1f}m {r['output_tokens_per_s']:10.0f} "
            f"{r.get('server_ttft_p99_s', float('nan')):16.3f} "
            f"{r.get('server_queue_p99_s', float('nan')):10.3f}"
        )
    print(
        "p99 TTFT passes 2 s at "
        + (f"{knee:.2f} requests/s" if knee else "no measured rate (widen --rates)")
    )


if __name__ == "__main__":
    main()
