"""A test-only draft proposer that forces an acceptance rate by construction.

A first pass without speculation gives each prompt's greedy output; :class:`ReplayProposer`
then proposes, for a request that has generated ``n`` tokens, the next tokens of that output,
with a chosen share of them corrupted (replaced by another token id). Under greedy decoding a
replayed token is accepted exactly when it is uncorrupted and every draft before it was, so
``corrupt_share`` 0 gives 100% acceptance and ``s`` gives a per-token rate of ``1 - s``
(the first corrupted draft ends each step's run).

Which drafts are corrupted depends only on (prompt, position, seed): two runs corrupt the
same ones. Requests whose prompt has no recorded output get no drafts.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence


class ReplayProposer:
    """``propose(request, room)`` for ``Speculation.propose`` (engine/core/speculation.py)."""

    def __init__(
        self,
        outputs: Iterable[tuple[Sequence[int], Sequence[int]]],
        vocab_size: int,
        corrupt_share: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= corrupt_share <= 1.0:
            raise ValueError(f"corrupt_share must be in [0, 1]; got {corrupt_share}")
        self.outputs = {tuple(prompt): list(output) for prompt, output in outputs}
        self.vocab_size = vocab_size
        self.corrupt_share = corrupt_share
        self.seed = seed

    def __call__(self, request, room: int) -> list[int]:
        output = self.outputs.get(tuple(request.prompt_token_ids))
        if output is None:
            return []
        done = request.num_output_tokens
        if output[:done] != request.output_token_ids:
            return []  # the request left the recorded path (sampling): nothing to replay
        drafts = []
        for position in range(done, min(done + room, len(output))):
            token = output[position]
            if self._corrupted(request.prompt_token_ids, position):
                token = (token + 1) % self.vocab_size
            drafts.append(token)
        return drafts

    def _corrupted(self, prompt: Sequence[int], position: int) -> bool:
        if self.corrupt_share == 0.0:
            return False
        draw = random.Random(hash((self.seed, tuple(prompt), position)))
        return draw.random() < self.corrupt_share
