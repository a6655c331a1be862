"""``metroline serve MODEL [flags]``: the OpenAI-compatible server, flags shaped like
``vllm serve``. ``MODEL`` is a local Hugging Face checkpoint directory, or ``demo`` for the
embedded demo model."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .bench import BENCHMARKS, run_benchmark
from .config import EngineArgs
from .flags import add_flags, flag_values
from .server.args import ServerArgs

logger = logging.getLogger("metroline.cli")


def _demo_path() -> str:
    from .demo import demo_model_path

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
    add_flags(serve.add_argument_group("engine"), EngineArgs, skip=("model",))
    server = serve.add_argument_group("server")
    add_flags(server, ServerArgs, skip=_LIMITS + _SERVER_OWN_FLAGS)
    server.add_argument(
        "--served-model-name", nargs="+", default=None, help="names clients use (default: MODEL)"
    )
    server.add_argument(
        "--api-key",
        default=os.environ.get("METROLINE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $METROLINE_API_KEY)",
    )
    server.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    server.add_argument("--log-format", default="text", choices=["text", "json"])
    server.add_argument("--disable-uvicorn-access-log", action="store_true")
    limits = serve.add_argument_group("limits (docs/serving.md)")
    add_flags(limits, ServerArgs, skip=tuple(_server_fields() - set(_LIMITS)))
    return parser


#: ServerArgs fields shown as "limits" (the rest as "server").
_LIMITS = (
    "max_request_bytes",
    "max_sequences_per_request",
    "max_connections",
    "header_timeout",
    "keep_alive_timeout",
    "body_timeout",
    "send_timeout",
    "max_preparing_bytes",
)
#: ServerArgs fields whose flags have a shape of their own (made above, by hand).
_SERVER_OWN_FLAGS = ("served_model_names", "api_key", "log_level", "log_format", "access_log")


def _server_fields() -> set[str]:
    return {field.name for field in dataclasses.fields(ServerArgs)}


def _model_path(model: str) -> str:
    if model == "demo" and not Path(model).is_dir():
        return _demo_path()
    return model


def run_serve(ns: argparse.Namespace) -> int:
    from .server import serve
    from .server.logs import configure_logging

    level = getattr(logging, ns.log_level.upper())
    configure_logging(level, ns.log_format)
    model = _model_path(ns.model)
    try:
        engine_args = EngineArgs(model=model, **flag_values(ns, EngineArgs, skip=("model",)))
        config = engine_args.create_config()
        server_args = ServerArgs(
            served_model_names=tuple(ns.served_model_name or [ns.model]),
            api_key=ns.api_key or None,
            log_level=level,
            log_format=ns.log_format,
            access_log=not ns.disable_uvicorn_access_log,
            **flag_values(ns, ServerArgs, skip=_SERVER_OWN_FLAGS),
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
