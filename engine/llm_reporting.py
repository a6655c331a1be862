"""What the offline ``LLM`` shows a user: its start-up lines and the ``generate`` progress bar.

Logging: as vLLM does, the engine's INFO lines appear without the user configuring logging.
When the root logger has no handler, one stderr handler goes on the ``metroline`` logger
(level INFO); it stays silent whenever the root logger has a handler, so a user who
configures logging, before or after, sees each line once, through their own handlers.

Progress: the bar counts generated tokens, step by step, towards the most the requests may
still generate (each sequence's ``max_tokens``, or what fits in ``max_model_len``); the total
shrinks to the real count as requests finish, so the bar ends full. Its postfix shows input
(prompt) and output tokens per second and the requests finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import IO, Any

from tqdm.auto import tqdm

from .messages import EngineCoreOutput
from .outputs import RequestOutput

PACKAGE_LOGGER = "metroline"


class _DefaultHandler(logging.StreamHandler):
    """The handler :func:`attach_default_log_handler` adds (found again by its type)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not logging.getLogger().handlers and super().filter(record)


def attach_default_log_handler() -> None:
    """Show the engine's INFO lines on stderr unless logging is configured (see the module
    docstring). Idempotent."""
    package = logging.getLogger(PACKAGE_LOGGER)
    if package.handlers or logging.getLogger().handlers:
        return
    handler = _DefaultHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


def ready_line(core: Any) -> str:
    """The start-up summary of an engine core: model, dtype, weights, load time, KV cache
    capacity in tokens and the concurrency it allows at ``max_model_len``."""
    config = core.config
    model = config.model
    reports = core.executor.load_reports()
    weights = sum(r["param_bytes"] for r in reports)
    seconds = max(r["seconds"] for r in reports)
    tokens = core.num_blocks * config.cache.block_size
    return (
        f"LLM ready: {model.path} ({model.arch.architecture}, {str(model.dtype).split('.')[-1]}"
        f", TP={config.parallel.tensor_parallel_size}), weights {weights / 2**30:.2f} GiB "
        f"loaded in {seconds:.1f} s; KV cache {tokens} tokens ({core.num_blocks} blocks of "
        f"{config.cache.block_size}), maximum concurrency at max_model_len {model.max_model_len}"
        f": {tokens / model.max_model_len:.2f}x"
    )


class GenerateProgress:
    """The ``generate`` progress bar (see the module docstring). ``requests`` maps each
    user request id to its core requests' (id, prompt length, token budget)."""

    def __init__(
        self,
        requests: dict[str, list[tuple[str, int, int]]],
        enabled: bool = True,
        file: IO[str] | None = None,
    ) -> None:
        self._request_of = {core: user for user, cores in requests.items() for core, _, _ in cores}
        self._prompt_len = {core: n for cores in requests.values() for core, n, _ in cores}
        self._budget = {core: b for cores in requests.values() for core, _, b in cores}
        self._generated = dict.fromkeys(self._request_of, 0)
        self._cores = {user: [core for core, _, _ in cores] for user, cores in requests.items()}
        self._started: set[str] = set()
        self._finished: set[str] = set()
        self.input_tokens = 0
        self.output_tokens = 0
        self._start = time.monotonic()
        self.bar = tqdm(
            total=sum(self._budget.values()),
            desc="generate",
            unit="tok",
            disable=not enabled,
            file=file,
            dynamic_ncols=True,
        )

    def update(self, core_outputs: Iterable[EngineCoreOutput], done: list[RequestOutput]) -> None:
        """One engine step: its core outputs, and the requests that finished with it."""
        new = 0
        for output in core_outputs:
            core = output.request_id
            if self._request_of.get(core) in self._finished or core not in self._request_of:
                continue  # a token computed past a stop the client found: dropped
            if core not in self._started:
                self._started.add(core)
                self.input_tokens += self._prompt_len[core]
            self._generated[core] += len(output.new_token_ids)
            new += len(output.new_token_ids)
        self.output_tokens += new
        for request in done:
            self._finished.add(request.request_id)
            for core in self._cores.get(request.request_id, ()):
                self.bar.total -= self._budget[core] - self._generated[core]
        elapsed = max(time.monotonic() - self._start, 1e-9)
        self.bar.set_postfix_str(
            f"input {self.input_tokens / elapsed:.1f} tok/s, output "
            f"{self.output_tokens / elapsed:.1f} tok/s, requests {len(self._finished)}/"
            f"{len(self._cores)}",
            refresh=False,
        )
        self.bar.update(new)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> GenerateProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
