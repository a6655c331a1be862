"""``metroline serve MODEL [flags]``: the OpenAI-compatible server, flags shaped like
``vllm serve``. ``MODEL`` is a local Hugging Face checkpoint directory, a Hugging Face model id
(``org/name``, from the local cache or downloaded), or ``demo`` for the embedded demo model.

As with ``vllm serve``: the model may also come as ``--model MODEL`` or as ``model:`` in a
``--config FILE.yaml`` (whose other keys are flags; the command line's flags win), integer
flags take ``32k`` (32000) or ``32K`` (32768), ``$VLLM_API_KEY`` is the API key when
``$METROLINE_API_KEY`` is not set, and ``metroline --version`` names the version. A flag this
server does not know exits with status 2 and the ``serve`` usage."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .bench import BENCHMARKS, run_benchmark
from .config import SERVING_DEFAULTS, EngineArgs
from .config_file import ConfigFileError, expand_config
from .flags import add_flags, flag_values
from .server.args import ServerArgs

logger = logging.getLogger("metroline.cli")


def _demo_path() -> str:
    from .demo import demo_model_path

    return str(demo_model_path())


def _version() -> str:
    try:
        return version("metroline")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metroline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"metroline {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="run a benchmark (metroline bench NAME --help for its options)",
        description="Benchmarks: "
        + "; ".join(f"{name}: {what}" for name, what in BENCHMARKS.items()),
    )
    bench.add_argument("benchmark", choices=list(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "model",
        help="checkpoint directory, Hugging Face model id, or 'demo' for the embedded model "
        "(or --model MODEL, as with vllm serve)",
    )
    serve.add_argument(
        "--config",
        help="YAML file of flags (keys: flag names; the command line's flags win)",
    )
    add_flags(
        serve.add_argument_group("engine"), EngineArgs, skip=("model",), defaults=SERVING_DEFAULTS
    )
    server = serve.add_argument_group("server")
    add_flags(server, ServerArgs, skip=_LIMITS + _SERVER_OWN_FLAGS)
    server.add_argument(
        "--served-model-name", nargs="+", default=None, help="names clients use (default: MODEL)"
    )
    server.add_argument(
        "--api-key",
        default=os.environ.get("METROLINE_API_KEY", os.environ.get("VLLM_API_KEY")),
        help="require 'Authorization: Bearer KEY' on the API (default: $METROLINE_API_KEY, "
        "else $VLLM_API_KEY)",
    )
    server.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default: info)",
    )
    server.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="(default: text)"
    )
    server.add_argument(
        "--disable-uvicorn-access-log",
        action="store_true",
        help="no log line per HTTP request (default: one per request)",
    )
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


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def _model_flag_first(args: list[str], serve: argparse.ArgumentParser) -> tuple[list[str], bool]:
    """``args`` with ``--model X`` (vLLM's older form) moved to the front as the positional
    MODEL, and whether it was there."""
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--model" or arg.startswith("--model="):
            if arg == "--model":
                if index + 1 >= len(args):
                    serve.error("argument --model: expected one argument")
                model, rest = args[index + 1], args[index + 2 :]
            else:
                model, rest = arg.split("=", 1)[1], args[index + 1 :]
            return [model, *args[:index], *rest], True
    return args, False


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` as ``metroline`` reads it; on a mistake, the usage of the sub-command at
    fault and exit status 2."""
    parser = build_parser()
    argv = list(argv)
    if argv[:1] == ["serve"]:
        serve = serve_parser(parser)
        args, moved = _model_flag_first(argv[1:], serve)
        try:
            args = expand_config(args, serve)
        except ConfigFileError as error:
            serve.error(str(error))
        ns, unknown = parser.parse_known_args(["serve", *args])
        if unknown:
            if moved and not unknown[0].startswith("-"):
                serve.error("the model is given twice: give it as MODEL or as --model, once")
            serve.error(f"unrecognized arguments: {' '.join(unknown)}")
        return ns
    return parser.parse_args(argv)


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
    return serve(config, server_args)


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP threads (torch's CPU ops) sleep when idle instead of spinning: under CPU
    # contention (a throttled pod, tokenizer threads, a busy CI machine) spinning threads
    # made CPU steps ten times slower. Set before torch loads, here and in every child.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ns = parse_command_line(sys.argv[1:] if argv is None else argv)
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
