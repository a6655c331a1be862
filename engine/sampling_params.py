"""Sampling parameters of one request, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .structured_outputs import StructuredOutputsParams

#: Temperatures below this are treated as greedy decoding.
GREEDY_EPS = 1e-5
#: Largest number of top log-probabilities a request may ask for per token.
MAX_LOGPROBS = 20
#: Seeds a torch generator accepts (a 64-bit value, signed or not).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
#: Most sequences one request may ask for (OpenAI's limit on ``n``).
MAX_N = 128
#: Largest count a request may give (``top_k``, ``max_tokens``, ``min_tokens``, token ids):
#: every count fits the int32 and int64 tensors it ends up in.
MAX_COUNT = 2**31 - 1
#: Most stop strings per request, and the longest one (characters): each new piece of text
#: is searched for every stop string, so together they bound that work per token.
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
#: Most stop token ids per request.
MAX_STOP_TOKEN_IDS = 256
#: Most ``logit_bias`` entries (OpenAI's limit) and the largest bias either way.
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGIT_BIAS = 100.0
#: Most ``allowed_token_ids`` (the engine also checks: at most the vocabulary size).
MAX_ALLOWED_TOKEN_IDS = 2**18
#: Most ``bad_words``, and the longest one (characters): each is tokenised twice, and each
#: step compares the tail of the output with every word's tokens.
MAX_BAD_WORDS = 128
MAX_BAD_WORD_CHARS = 256


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop (the vLLM field set).

    Invariant after construction: every field is within its documented range (numbers are
    finite, counts at most :data:`MAX_COUNT`), ``stop`` is a tuple of at most
    :data:`MAX_STOP_STRINGS` non-empty strings of at most :data:`MAX_STOP_STRING_CHARS`
    characters and ``stop_token_ids`` a tuple of at most :data:`MAX_STOP_TOKEN_IDS` ints in
    ``[0, MAX_COUNT]`` (the engine checks them against the vocabulary). ``logit_bias`` is a
    dict of at most :data:`MAX_LOGIT_BIAS_ENTRIES` token ids (ints, or strings of digits as
    JSON sends them) to biases in ``[-100, 100]``, ``allowed_token_ids`` a non-empty tuple of
    at most :data:`MAX_ALLOWED_TOKEN_IDS` token ids, ``bad_words`` a tuple of at most
    :data:`MAX_BAD_WORDS` non-blank strings of at most :data:`MAX_BAD_WORD_CHARS`
    characters. A bad value raises ``ValueError`` naming the field and what is allowed. A
    ``top_k`` above the vocabulary size keeps every token, as ``-1`` does.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | tuple[str, ...] | None = None
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    #: Log-probabilities of each prompt token (and this many alternatives) under the model.
    prompt_logprobs: int | None = None
    #: Drop special tokens (EOS, chat markers) from the returned text.
    skip_special_tokens: bool = True
    #: Keep the stop string (or the stop token's text) that ended the output in its text.
    include_stop_str_in_output: bool = False
    #: Token id -> bias added to its logit before sampling (-100 bans, +100 forces).
    logit_bias: dict[int, float] | None = None
    #: Only these tokens may be generated.
    allowed_token_ids: list[int] | tuple[int, ...] | None = None
    #: Words never generated: a word's last token is banned while its other tokens have
    #: just been generated (tokenised with and without a leading space).
    bad_words: list[str] | tuple[str, ...] | None = None
    #: What the output must match (a JSON schema, a regex, ...; a dict of the same fields is
    #: taken too). The grammar itself is checked where the request enters the engine.
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = _structured_outputs(self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise ValueError(
                "structured_outputs must be StructuredOutputsParams, a dict of its fields or "
                f"None, got {type(self.structured_outputs).__name__}"
            )
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        for name in ("stop", "stop_token_ids", "bad_words"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list, got {type(value).__name__}")
            setattr(self, name, tuple(value or ()))
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)):
                raise ValueError(
                    f"allowed_token_ids must be a list, got {type(self.allowed_token_ids).__name__}"
                )
            self.allowed_token_ids = tuple(self.allowed_token_ids)
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {shown(getattr(self, name))}")

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"an integer in [1, {MAX_N}]")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0 (0 means greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or not (self.top_k in (-1, 0) or 1 <= self.top_k <= MAX_COUNT):
            raise bad("top_k", f"-1 or 0 (disabled) or an integer in [1, {MAX_COUNT}]")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(name, "in [-2, 2]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a finite number > 0 (1 disables it)")
        if self.seed is not None and (
            not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1)
        ):
            # n > 1 gives sequence i the seed ``seed + i``: all of them must be valid.
            raise bad("seed", f"an integer in [{SEED_MIN}, {SEED_MAX} - (n - 1)] or None")
        if self.max_tokens is not None and not _is_count(self.max_tokens, 1):
            raise bad(
                "max_tokens", f"an integer in [1, {MAX_COUNT}] (or None: up to max_model_len)"
            )
        if not _is_count(self.min_tokens, 0):
            raise bad("min_tokens", f"an integer in [0, {MAX_COUNT}]")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if len(self.stop) > MAX_STOP_STRINGS or any(
            not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop
        ):
            raise ValueError(
                f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings, each "
                f"of 1 to {MAX_STOP_STRING_CHARS} characters"
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(
            not _is_count(t, 0) for t in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids in "
                f"[0, {MAX_COUNT}]"
            )
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise bad("prompt_logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
        if self.allowed_token_ids is not None and (
            not 0 < len(self.allowed_token_ids) <= MAX_ALLOWED_TOKEN_IDS
            or any(not _is_count(t, 0) for t in self.allowed_token_ids)
        ):
            raise ValueError(
                f"allowed_token_ids must be a non-empty list of at most {MAX_ALLOWED_TOKEN_IDS} "
                f"token ids in [0, {MAX_COUNT}] (or None)"
            )
        if len(self.bad_words) > MAX_BAD_WORDS or any(
            not isinstance(w, str) or not w.strip() or len(w) > MAX_BAD_WORD_CHARS
            for w in self.bad_words
        ):
            raise ValueError(
                f"bad_words must be a list of at most {MAX_BAD_WORDS} words, each of 1 to "
                f"{MAX_BAD_WORD_CHARS} characters and not only spaces"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def restricts_tokens(self) -> bool:
        """``logit_bias``, ``allowed_token_ids`` or ``bad_words`` change the logits."""
        return bool(self.logit_bias) or self.allowed_token_ids is not None or bool(self.bad_words)

    @property
    def uses_penalties(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )

    def clone(self, **changes: object) -> SamplingParams:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _logit_bias(value: object) -> dict[int, float]:
    """``logit_bias`` with int keys (JSON object keys are strings of digits), checked."""
    allowed = (
        f"a dict of at most {MAX_LOGIT_BIAS_ENTRIES} token ids (in [0, {MAX_COUNT}]) to "
        f"biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
    )
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias must be {allowed}, got {shown(value)}")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        token = key
        if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10:
            token = int(key)
        if not _is_count(token, 0):
            raise ValueError(
                f"logit_bias keys must be token ids in [0, {MAX_COUNT}], got {shown(key)}"
            )
        if not _is_number(amount) or not -MAX_LOGIT_BIAS <= amount <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must be {allowed}, got {shown(amount)} for token {token}")
        bias[token] = float(amount)
    return bias


def _structured_outputs(fields: dict[str, Any]) -> StructuredOutputsParams:
    known = {f.name for f in dataclasses.fields(StructuredOutputsParams) if f.init}
    unknown = sorted(str(name) for name in fields if name not in known)
    if unknown:
        raise ValueError(
            f"structured_outputs has no field {shorten(unknown[0], 60)!r}; the fields are "
            f"{', '.join(sorted(known))}"
        )
    return StructuredOutputsParams(**fields)


def shorten(text: str, limit: int) -> str:
    """``text``, cut to ``limit`` characters with "..." (for messages that echo input)."""
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def shown(value: object) -> str:
    """A value for an error message, cut short (a client may send a huge one)."""
    if _is_int(value) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(shown(item) for item in value[:5])
        return text + (", ...]" if len(value) > 5 else "]")
    return shorten(repr(value), 60)


def _is_count(value: object, lowest: int) -> bool:
    return _is_int(value) and lowest <= value <= MAX_COUNT


def _is_number(value: object) -> bool:
    """A finite int or float (NaN and infinities are not numbers here)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False
