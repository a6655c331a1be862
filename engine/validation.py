"""What every request must satisfy before the engine core takes it.

Checked twice with the same function: by the client (so a bad request is a 400 before it
reaches the core) and by the core itself (the last line, for callers that skip the client).
"""

from __future__ import annotations

from .config import EngineConfig
from .messages import EngineCoreRequest
from .sampling_params import shown


def validate_request(spec: EngineCoreRequest, config: EngineConfig) -> None:
    """Reject what the engine cannot serve, with a message saying what is allowed."""
    prompt = spec.prompt_token_ids
    max_len = config.model.max_model_len
    vocab = config.model.arch.vocab_size
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if len(prompt) >= max_len:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens, but max_model_len is {max_len}: the prompt "
            "plus at least one generated token must fit"
        )
    bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {shown(bad[:5])}")
    params = spec.sampling_params
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}); got {shown(bad[:5])}")
    bad = [t for t in params.logit_bias or () if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"logit_bias keys must be token ids in [0, {vocab}); got {shown(bad[:5])}")
    allowed = params.allowed_token_ids
    if allowed is not None:
        bad = [t for t in allowed if not 0 <= t < vocab]
        if bad or len(allowed) > vocab:
            raise ValueError(
                f"allowed_token_ids must be at most {vocab} token ids in [0, {vocab}); got "
                f"{shown(bad[:5]) if bad else f'{len(allowed)} ids'}"
            )
    if params.structured_outputs is not None and not config.model.has_tokenizer:
        raise ValueError("structured outputs need the model's tokenizer; this model has none")
    if params.bad_words and not spec.bad_words_token_ids:
        raise ValueError("bad_words were not tokenised: add the request through an InputProcessor")
    bad = [t for word in spec.bad_words_token_ids for t in word if not 0 <= t < vocab]
    if bad:
        raise ValueError(
            f"bad_words must tokenise to token ids in [0, {vocab}); got {shown(bad[:5])}"
        )
    if allowed is not None:
        _check_some_token_stays(spec, set(allowed))


def _check_some_token_stays(spec: EngineCoreRequest, allowed: set[int]) -> None:
    """A row whose every token is banned would have only -inf logits (NaN probabilities, an
    arbitrary token): refuse ``allowed_token_ids`` that the bans leave empty."""
    params = spec.sampling_params
    always_banned = {word[0] for word in spec.bad_words_token_ids if len(word) == 1}
    left = allowed - always_banned
    if not left:
        raise ValueError(
            "allowed_token_ids are all banned by bad_words: no token would be left to generate"
        )
    if params.min_tokens > 0:
        eos = () if params.ignore_eos else spec.eos_token_ids
        ends = set(params.stop_token_ids) | set(eos)
        if not left - ends:
            rest = ", beside those bad_words ban," if always_banned else ""
            raise ValueError(
                f"allowed_token_ids leave{rest} only end-of-sequence or stop_token_ids tokens, "
                f"which min_tokens ({params.min_tokens}) bans: no token would be left to generate"
            )
