"""Speculative decoding (issue 20): the parts that need no scheduler or model runner.

- ``config``: :class:`SpeculativeConfig`, parsed from vLLM's ``--speculative-config``
  spelling; the one home of every speculative-decoding default and bound.
- ``ngram``: prompt-lookup proposals on the host (numpy, vectorised, bounded window).
- ``rejection``: verification of K+1 target positions per request (torch, no host sync):
  exact argmax acceptance for greedy, speculative sampling for the rest.

Engine-core and worker code; nothing here imports the server or the client. Only the
(pure-Python) config is re-exported, so reading a config loads neither numpy nor torch.
"""

from .config import (
    DEFAULT_PROMPT_LOOKUP,
    DRAFT_PAD_TOKEN,
    MAX_NUM_SPECULATIVE_TOKENS,
    MAX_PROMPT_LOOKUP,
    METHODS,
    SpeculativeConfig,
    parse_speculative_config,
)

__all__ = [
    "DEFAULT_PROMPT_LOOKUP",
    "DRAFT_PAD_TOKEN",
    "MAX_NUM_SPECULATIVE_TOKENS",
    "MAX_PROMPT_LOOKUP",
    "METHODS",
    "SpeculativeConfig",
    "parse_speculative_config",
]
