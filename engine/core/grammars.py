"""Structured-output grammars on the core's side: compiled off the engine loop, one matcher
per request, and each step's token bitmask.

Invariants: compiling never runs on the engine loop's thread (a pool of
:data:`COMPILE_THREADS` threads; xgrammar releases the GIL while it compiles); equal
parameters (``StructuredOutputsParams.key``) compile once while they stay among the
:data:`CACHE_SIZE` most recently used; a request's matcher has accepted exactly the request's
output tokens so far (the scheduler feeds it each token it takes), so the bitmask filled for
a step is the set of tokens the grammar allows next. A matcher that has accepted a stop
token allows only stop tokens (the request ends there unless it ignores EOS).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..checkpoint import load_tokenizer
from ..config import EngineConfig
from ..messages import GRAMMAR_STEP_BUDGET_S, GRAMMAR_TOO_COSTLY, NO_ALLOWED_TOKEN
from ..structured_outputs import StructuredOutputsParams, build_grammar

logger = logging.getLogger(__name__)

#: Grammars compiled at once (each compile may also use xgrammar's own threads).
COMPILE_THREADS = 2
#: Compiled grammars kept for reuse (most recently used), by count and by their memory.
CACHE_SIZE = 128
CACHE_BYTES = 2 * 2**30
#: The per-row budget of a step (messages.GRAMMAR_STEP_BUDGET_S; a name here, so tests may
#: change it).
STEP_BUDGET_S = GRAMMAR_STEP_BUDGET_S
#: Threads that fill a step's bitmask rows (each row costs up to a fraction of a
#: millisecond for a large vocabulary: a step of hundreds of rows is spread over them).
FILL_THREADS = max(1, min(16, (os.cpu_count() or 2) // 2))
#: Fewest rows a fill thread takes (below that, one thread fills them all).
FILL_ROWS_PER_THREAD = 16


class RequestGrammar:
    """One request's position in its grammar. ``stop_token_ids`` are the request's EOS ids:
    the grammar allows them once its output is complete."""

    __slots__ = ("matcher", "stop_token_ids")

    def __init__(self, compiled: Any, stop_token_ids: tuple[int, ...]) -> None:
        import xgrammar

        self.stop_token_ids = stop_token_ids
        self.matcher = xgrammar.GrammarMatcher(
            compiled, override_stop_tokens=list(stop_token_ids) or None
        )

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def accept(self, token_id: int) -> str | None:
        """Advance by ``token_id``; None if taken, else why not (the grammar does not allow
        it, or taking it ran over :data:`STEP_BUDGET_S`). After a stop token, only stop
        tokens are taken (and change nothing)."""
        if self.matcher.is_terminated():
            return None if token_id in self.stop_token_ids else NO_ALLOWED_TOKEN
        started = time.perf_counter()
        if not self.matcher.accept_token(token_id):
            return NO_ALLOWED_TOKEN
        return GRAMMAR_TOO_COSTLY if time.perf_counter() - started > STEP_BUDGET_S else None


class GrammarManager:
    """Compiles grammars against the model's tokenizer (loaded at the first structured
    request) and fills bitmasks. ``vocab_size`` is the model's (the logits' width); ids the
    tokenizer does not have are never allowed."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.vocab_size = config.model.arch.vocab_size
        self._pool: ThreadPoolExecutor | None = None
        self._compiler: Future | None = None
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._buffers: list[torch.Tensor] = []
        self._next_buffer = 0
        self._fill_pool: ThreadPoolExecutor | None = None
        #: Seconds each finished compile took (read by benchmarks; the latest
        #: :data:`CACHE_SIZE`).
        self.compile_seconds: list[float] = []

    def compile(self, params: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar of ``params`` (shared by equal parameters)."""
        with self._lock:
            future = self._cache.get(params.key)
            if future is not None and not future.cancelled() and not _failed(future):
                self._cache.move_to_end(params.key)
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(COMPILE_THREADS, "metroline-grammar")
            if self._compiler is None or _failed(self._compiler):
                self._compiler = self._pool.submit(self._make_compiler)  # again after a failure
            future = self._pool.submit(self._compile, params)
            self._cache[params.key] = future
            self._evict()
            return future

    def _evict(self) -> None:
        """Drop the least recently used grammars beyond :data:`CACHE_SIZE` entries or
        :data:`CACHE_BYTES` of compiled memory (called with the lock held)."""
        held = sum(_size(f) for f in self._cache.values())
        while len(self._cache) > 1 and (len(self._cache) > CACHE_SIZE or held > CACHE_BYTES):
            _, dropped = self._cache.popitem(last=False)
            held -= _size(dropped)

    def _make_compiler(self) -> Any:
        import xgrammar

        model = self.config.model
        if not model.has_tokenizer:
            raise ValueError("structured outputs need the model's tokenizer; it has none")
        started = time.perf_counter()
        tokenizer = load_tokenizer(model.tokenizer_path)
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer,
            vocab_size=self.vocab_size,
            stop_token_ids=list(model.arch.eos_token_ids) or None,
        )
        threads = max(1, min(8, (os.cpu_count() or 2) // 2))
        compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        logger.info(
            "structured outputs: tokenizer of %d tokens read for grammars in %.2f s",
            info.vocab_size,
            time.perf_counter() - started,
        )
        return compiler

    def _compile(self, params: StructuredOutputsParams) -> Any:
        compiler = self._compiler.result()
        started = time.perf_counter()
        compiled = compiler.compile_grammar(build_grammar(params))
        seconds = time.perf_counter() - started
        with self._lock:
            self._evict()
        self.compile_seconds = [*self.compile_seconds[-(CACHE_SIZE - 1) :], seconds]
        logger.debug("compiled a %s grammar in %.3f s", params.kind, seconds)
        return compiled

    def fill_bitmask(
        self, grammars: list[RequestGrammar | None]
    ) -> tuple[torch.Tensor, dict[int, str]]:
        """Rows ``[len(grammars), ceil(vocab / 32)]`` int32, one per grammar in order: bit
        ``t`` of a row is set when token ``t`` may come next; a ``None`` grammar allows
        every token. Also the rows whose grammar failed to fill or took longer than
        :data:`STEP_BUDGET_S` (their row allows nothing), with the reason: their requests
        must be failed. Two buffers alternate, so a row is not rewritten while the step
        before still copies it to the device (the core reads each step's tokens before
        filling the step after next)."""
        rows = len(grammars)
        buffer = self._buffer(rows)
        buffer[:rows].fill_(-1)
        live = [(i, g.matcher) for i, g in enumerate(grammars) if g is not None]
        live = [(i, m) for i, m in live if not m.is_terminated()]
        chunks = min(len(live) // FILL_ROWS_PER_THREAD, FILL_THREADS)
        failed: dict[int, str] = {}
        if chunks > 1:
            if self._fill_pool is None:
                self._fill_pool = ThreadPoolExecutor(FILL_THREADS, "metroline-bitmask")
            # xgrammar releases the GIL while it fills: the threads run at once.
            parts = [live[k::chunks] for k in range(chunks)]
            for part_failed in self._fill_pool.map(_fill_rows, [buffer] * chunks, parts):
                failed.update(part_failed)
        else:
            failed = _fill_rows(buffer, live)
        for row, grammar in enumerate(grammars):
            if grammar is not None and grammar.is_terminated:
                _only(buffer[row], grammar.stop_token_ids)
        for row in failed:
            buffer[row].zero_()
        return buffer[:rows], failed

    def _buffer(self, rows: int) -> torch.Tensor:
        words = (self.vocab_size + 31) // 32
        capacity = max(rows, self.config.scheduler.max_num_seqs)
        if not self._buffers or self._buffers[0].shape[0] < rows:
            pin = self.config.device.type == "cuda"
            self._buffers = [
                torch.empty((capacity, words), dtype=torch.int32, pin_memory=pin) for _ in range(2)
            ]
        self._next_buffer ^= 1
        return self._buffers[self._next_buffer]

    def shutdown(self) -> None:
        for pool in (self._pool, self._fill_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


def _fill_rows(buffer: torch.Tensor, rows: list[tuple[int, Any]]) -> dict[int, str]:
    """Fill ``rows`` of ``buffer``; returns the rows that failed or ran over budget."""
    failed = {}
    for row, matcher in rows:
        started = time.perf_counter()
        try:
            matcher.fill_next_token_bitmask(buffer, row)
        except Exception as error:  # one grammar's fault fails its request alone
            failed[row] = f"its grammar failed: {type(error).__name__}: {error}"[:500]
            continue
        if time.perf_counter() - started > STEP_BUDGET_S:
            failed[row] = GRAMMAR_TOO_COSTLY
    return failed


def _failed(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is not None


def _size(future: Future) -> int:
    """Memory of a compiled grammar (0 while it compiles or when it failed)."""
    if not future.done() or future.cancelled() or future.exception() is not None:
        return 0
    return future.result().memory_size_bytes


def _only(row: torch.Tensor, token_ids: tuple[int, ...]) -> None:
    """Set ``row`` (int32 words of 32 token bits) to allow exactly ``token_ids``."""
    words = row.numpy().view("uint32")
    words[:] = 0
    for token in token_ids:
        word, bit = divmod(token, 32)
        if word < len(words):
            words[word] |= 1 << bit
