"""The scheduler's side of speculative decoding: which requests draft, how many tokens, and
what verification accepted.

A request drafts in a step when it is decoding (one token to compute, none in flight) and
nothing about it needs the exact token history or a grammar at each position (penalties,
``min_tokens``, bad words of several tokens, structured outputs), and it is not a seeded
sampling request: those decode one token at a time, as without speculation. (A seeded
request's tokens must not depend on the rest of the batch; how many drafts it could verify
does: the step's budget and free blocks decide it. Undrafted, it draws exactly as without
speculation.) Its drafts are bounded by the configured K, by the
step's remaining token budget, and by the room left before ``max_tokens`` and
``max_model_len``, so a verified step never emits past either.

Counters are cumulative since the engine started (vLLM's ``spec_decode_*`` metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..messages import RunningRequestData, SchedulerOutput
from ..spec_decode.config import DRAFT_PAD_TOKEN, SpeculativeConfig
from ..spec_decode.ngram import MAX_LOOKUP_TOKENS, propose_ngram
from .kv_cache import KVCacheManager
from .request import Request


class Speculation:
    """Proposes drafts for eligible requests and counts what verification accepted."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * config.num_speculative_tokens
        #: ``propose(request, room)`` -> up to ``room`` draft tokens. The n-gram proposer,
        #: or with a draft model ``room`` placeholders that the workers' draft model fills
        #: (:mod:`metroline.engine.worker.draft_proposer`); benchmarks and tests put their
        #: own here (drafts replayed from a first pass, to force an acceptance rate).
        self.propose: Callable[[Request, int], Sequence[int]] = (
            self.propose_ngram if config.method == "ngram" else _placeholders
        )
        self._arrays: dict[str, tuple[np.ndarray, int]] = {}

    def add_drafts(
        self,
        drafting: list[tuple[Request, RunningRequestData]],
        out: SchedulerOutput,
        kv_cache_manager: KVCacheManager,
        budget: int,
    ) -> int:
        """A step's second pass: drafts after the next token of each request that may draft
        (``drafting``: scheduled this step, with the diff sent for it), in scheduling order,
        while the budget and free blocks last (never preempting). Returns the budget left."""
        for request, diff in drafting:
            if budget <= 0:
                break
            drafts = self.drafts(request, budget)
            blocks = kv_cache_manager.allocate_slots(request, len(drafts)) if drafts else None
            if blocks is None:
                continue
            diff.new_block_ids.extend(block.block_id for block in blocks)
            out.num_scheduled_tokens[request.request_id] += len(drafts)
            out.spec_token_ids[request.request_id] = drafts
            request.num_computed_tokens += len(drafts)
            budget -= len(drafts)
        return budget

    def drafts(self, request: Request, budget: int) -> list[int]:
        """Up to ``budget`` draft tokens to follow ``request``'s scheduled next token."""
        room = min(
            self.config.num_speculative_tokens,
            budget,
            self.max_model_len - request.num_tokens - 1,
        )
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens - 1)
        if room <= 0:
            return []
        return list(self.propose(request, room))[:room]

    def propose_ngram(self, request: Request, room: int) -> list[int]:
        """Prompt lookup over the request's last tokens (see ``spec_decode/ngram.py``)."""
        window = self._tokens(request)[-MAX_LOOKUP_TOKENS:]
        config = self.config
        proposal = propose_ngram(window, room, config.prompt_lookup_min, config.prompt_lookup_max)
        return proposal.tolist()

    def _tokens(self, request: Request) -> np.ndarray:
        """The request's tokens as an array, kept per request and extended by what it gained
        since the last call (tokens are only ever appended), so a step copies only those."""
        tokens = request.all_token_ids
        buffer, filled = self._arrays.get(request.request_id, (None, 0))
        if buffer is None or len(tokens) > buffer.shape[0]:
            grown = np.empty(max(64, 2 * len(tokens)), dtype=np.int64)
            if buffer is not None:
                grown[:filled] = buffer[:filled]
            buffer = grown
        buffer[filled : len(tokens)] = tokens[filled:]
        self._arrays[request.request_id] = (buffer, len(tokens))
        return buffer[: len(tokens)]

    def forget(self, request_id: str) -> None:
        """The request finished: drop its token array."""
        self._arrays.pop(request_id, None)

    @staticmethod
    def settle(request: Request, kv_cache_manager: KVCacheManager) -> int | None:
        """After a verifying step that did not finish ``request``: KV exists for every token
        but the last (the target's), so the slots of rejected drafts go back to the pool.
        Returns the blocks the request keeps, or None when none were dropped."""
        request.num_computed_tokens = request.num_tokens - 1
        return kv_cache_manager.trim(request, request.num_computed_tokens)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """One request-step verified ``num_drafts`` drafts and accepted the first
        ``num_accepted``."""
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1


def _placeholders(request: Request, room: int) -> list[int]:
    """``room`` slots for the draft model's tokens (the workers write them before the step's
    forward pass)."""
    return [DRAFT_PAD_TOKEN] * room


def may_draft(request: Request) -> bool:
    """Whether ``request`` may draft this step (see the module docstring)."""
    return (
        request.num_pending_samples == 0
        and request.num_computed_tokens == request.num_tokens - 1
        and request.grammar is None
        and not request.needs_exact_history
        and (request.sampling_params.seed is None or request.sampling_params.greedy)
    )
