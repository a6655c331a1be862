"""``metroline serve MODEL [flags]``: the OpenAI-compatible server, flags shaped like
``vllm serve``. ``MODEL`` is a local Hugging Face checkpoint directory, or ``demo`` for the
embedded demo model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from metroline.engine.bench import BENCHMARKS, run_benchmark

logger = logging.getLogger("metroline.cli")


def _demo_path() -> str:
    from metroline.engine.demo import demo_model_path

    return str(demo_model_path())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metroline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="run a benchmark (metroline bench NAME --help for its options)",
        description="Benchmarks: "
        + "; ".join(f"{name}: {what}" for name, what in BENCHMARKS.items()),
    )
    bench.add_argument("benchmark", choices=list(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible API")
    serve.add_argument("model", help="checkpoint directory, or 'demo' for the embedded model")
    engine = serve.add_argument_group("engine")
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    engine.add_argument("--max-num-seqs", type=int, default=256)
    engine.add_argument("--max-num-batched-tokens", type=int, default=8192)
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True
    )
    engine.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    engine.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    engine.add_argument("--load-format", default="auto", help="auto, safetensors or dummy")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    engine.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan and launch each step while the previous one still runs (default: on for CUDA)",
    )
    engine.add_argument(
        "--mixed-step-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA graphs also for steps with prompt chunks, up to 4096 tokens (default: on "
        "at tensor-parallel size 2 or more)",
    )
    engine.add_argument("--seed", type=int, default=0)
    engine.add_argument("--device", default="auto", help="auto, cpu or cuda")
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument(
        "--served-model-name", nargs="+", default=None, help="names clients use (default: MODEL)"
    )
    server.add_argument(
        "--api-key",
        default=os.environ.get("METROLINE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $METROLINE_API_KEY)",
    )
    server.add_argument("--ready-kv-threshold", type=float, default=0.95)
    server.add_argument(
        "--ready-kv-low-watermark",
        type=float,
        default=None,
        help="ready again at or below this KV usage (default: threshold - 0.1)",
    )
    server.add_argument("--ready-max-waiting", type=int, default=None)
    server.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="answer 503 + Retry-After once this many requests wait (default: no limit)",
    )
    server.add_argument("--drain-timeout", type=float, default=30.0)
    limits = serve.add_argument_group("limits (defaults in docs/serving.md)")
    limits.add_argument(
        "--max-request-bytes", type=int, default=None, help="largest request body (413 beyond)"
    )
    limits.add_argument(
        "--max-sequences-per-request",
        type=int,
        default=None,
        help="largest prompts x n of one request (400 beyond)",
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="open connections at most; idle ones are closed first, then 503",
    )
    limits.add_argument(
        "--header-timeout", type=float, default=None, help="seconds to send a request's headers"
    )
    limits.add_argument(
        "--keep-alive-timeout", type=float, default=None, help="seconds an idle connection lives"
    )
    limits.add_argument(
        "--body-timeout", type=float, default=None, help="seconds to send a request's body"
    )
    limits.add_argument(
        "--send-timeout",
        type=float,
        default=None,
        help="seconds a response waits for a client that reads nothing",
    )
    limits.add_argument(
        "--max-preparing-bytes",
        type=int,
        default=None,
        help="bytes of request bodies being tokenised at once (503 beyond)",
    )
    server.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    server.add_argument("--log-format", default="text", choices=["text", "json"])
    server.add_argument("--disable-uvicorn-access-log", action="store_true")
    return parser


#: Server limits whose defaults live in ServerArgs (a flag left out keeps that default).
_LIMIT_FLAGS = (
    "max_request_bytes",
    "max_sequences_per_request",
    "max_connections",
    "header_timeout",
    "keep_alive_timeout",
    "body_timeout",
    "send_timeout",
    "max_preparing_bytes",
)


def _model_path(model: str) -> str:
    if model == "demo" and not Path(model).is_dir():
        return _demo_path()
    return model


def run_serve(ns: argparse.Namespace) -> int:
    from metroline.engine.engine_args import EngineArgs
    from metroline.engine.server import ServerArgs, serve
    from metroline.engine.server.logs import configure_logging

    level = getattr(logging, ns.log_level.upper())
    configure_logging(level, ns.log_format)
    model = _model_path(ns.model)
    engine_args = EngineArgs(
        model=model,
        tensor_parallel_size=ns.tensor_parallel_size,
        max_model_len=ns.max_model_len,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        block_size=ns.block_size,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        enable_prefix_caching=ns.enable_prefix_caching,
        kv_cache_memory_bytes=ns.kv_cache_memory_bytes,
        dtype=ns.dtype,
        load_format=ns.load_format,
        enforce_eager=ns.enforce_eager,
        async_scheduling=ns.async_scheduling,
        mixed_step_graphs=ns.mixed_step_graphs,
        seed=ns.seed,
        device=ns.device,
    )
    try:
        config = engine_args.create_config()
        server_args = ServerArgs(
            served_model_names=tuple(ns.served_model_name or [ns.model]),
            host=ns.host,
            port=ns.port,
            api_key=ns.api_key or None,
            ready_kv_threshold=ns.ready_kv_threshold,
            ready_kv_low_watermark=ns.ready_kv_low_watermark,
            ready_max_waiting=ns.ready_max_waiting,
            max_waiting_requests=ns.max_waiting_requests,
            drain_timeout=ns.drain_timeout,
            log_level=level,
            **{name: value for name in _LIMIT_FLAGS if (value := getattr(ns, name)) is not None},
            log_format=ns.log_format,
            access_log=not ns.disable_uvicorn_access_log,
        )
    except ValueError as error:
        logger.error("invalid configuration: %s", error)
        return 2
    logger.info(
        "serving %s as %s on http://%s:%d",
        model,
        server_args.model_name,
        server_args.host,
        server_args.port,
        extra={
            "fields": {"device": str(config.device), "max_model_len": config.model.max_model_len}
        },
    )
    return serve(config, server_args)


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP threads (torch's CPU ops) sleep when idle instead of spinning: under CPU
    # contention (a throttled pod, tokenizer threads, a busy CI machine) spinning threads
    # made CPU steps ten times slower. Set before torch loads, here and in every child.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "serve":
            return run_serve(ns)
        if ns.command == "bench":
            return run_benchmark(ns.benchmark, ns.args)
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
