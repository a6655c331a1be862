"""``--speculative-config`` / ``LLM(speculative_config=...)``: vLLM's spelling, parsed into a
frozen :class:`SpeculativeConfig`, and the one home of every speculative-decoding default and
bound.

Accepted (as a dict, or as the JSON text the command line passes)::

    {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": a, "prompt_lookup_max": b}
    {"method": "draft_model", "model": PATH, "num_speculative_tokens": K}

vLLM's semantics, kept here (``vllm/config/speculative.py``, ``SpeculativeConfig.__post_init__``):
``num_speculative_tokens`` is required (vLLM takes it from a draft checkpoint's config only
for methods we do not support); for ``ngram`` a missing ``prompt_lookup_min`` /
``prompt_lookup_max`` takes the other's value, and both missing means 5 and 5; a missing
``method`` with a ``model`` of ``"ngram"`` / ``"[ngram]"`` means ``ngram``, with any other
``model`` a plain draft model (vLLM would look inside the checkpoint for EAGLE / Medusa / MTP
heads; we support none of those, so the draft loader must refuse such a checkpoint).

Refused (ValueError), never accepted and dropped: every key other than the five above (vLLM
has many more: each needs its own support first), every other method (``eagle``, ``eagle3``,
``medusa``, ``mtp``, ``suffix``, ...), ``prompt_lookup_*`` with a draft model (vLLM silently
zeroes them), a ``model`` with ``ngram``, values out of bounds, and JSON text over
:data:`MAX_CONFIG_TEXT_BYTES` (before it is parsed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Most draft tokens per request and step (vLLM has no fixed bound). Verification runs K+1
#: query tokens per request, so K is bounded by what one step may hold, and acceptance of
#: position j decays like alpha**j: past 16 the extra positions only cost.
MAX_NUM_SPECULATIVE_TOKENS = 16
#: Longest n-gram the prompt-lookup proposer matches (its cost grows with n).
MAX_PROMPT_LOOKUP = 64
#: vLLM's ``prompt_lookup_min`` and ``prompt_lookup_max`` when neither is given.
DEFAULT_PROMPT_LOOKUP = 5
#: Most bytes of ``--speculative-config`` JSON text.
MAX_CONFIG_TEXT_BYTES = 64 * 1024
#: Longest draft-model path (Linux's PATH_MAX).
MAX_MODEL_PATH_CHARS = 4096
#: Marks the unused tail of a request's row in a ``[num_reqs, K]`` draft-token array (and
#: of a ``[num_reqs, K+1]`` array of verified tokens).
DRAFT_PAD_TOKEN = -1

METHODS = ("ngram", "draft_model")
#: vLLM method names that are known but not implemented here.
_UNSUPPORTED_METHODS = (
    "eagle",
    "eagle3",
    "medusa",
    "mlp_speculator",
    "mtp",
    "suffix",
    "ngram_gpu",
    "custom_class",
)
_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max")
_NGRAM_MODEL_NAMES = ("ngram", "[ngram]")


@dataclass(frozen=True)
class SpeculativeConfig:
    """A checked speculative-decoding setting.

    Invariants (checked on construction, however it is built): ``method`` is one of
    :data:`METHODS`; ``1 <= num_speculative_tokens <= MAX_NUM_SPECULATIVE_TOKENS``; for
    ``ngram``: ``model`` is None and ``1 <= prompt_lookup_min <= prompt_lookup_max <=
    MAX_PROMPT_LOOKUP``; for ``draft_model``: ``model`` is a non-empty path and both
    ``prompt_lookup_*`` are None.
    """

    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(_method_error(self.method))
        _check_int(
            "num_speculative_tokens", self.num_speculative_tokens, 1, MAX_NUM_SPECULATIVE_TOKENS
        )
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError(
                    "speculative_config: 'model' does not apply to method 'ngram' (the n-gram "
                    "proposer looks up the request's own tokens)"
                )
            low = _check_int("prompt_lookup_min", self.prompt_lookup_min, 1, MAX_PROMPT_LOOKUP)
            high = _check_int("prompt_lookup_max", self.prompt_lookup_max, 1, MAX_PROMPT_LOOKUP)
            if low > high:
                raise ValueError(
                    f"speculative_config: prompt_lookup_min={low} must be <= "
                    f"prompt_lookup_max={high}"
                )
            return
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("speculative_config: method 'draft_model' needs 'model' (a path)")
        if len(self.model) > MAX_MODEL_PATH_CHARS:
            raise ValueError(
                f"speculative_config: 'model' is longer than {MAX_MODEL_PATH_CHARS} characters"
            )
        given = [
            name
            for name in ("prompt_lookup_min", "prompt_lookup_max")
            if getattr(self, name) is not None
        ]
        if given:
            raise ValueError(
                f"speculative_config: {', '.join(given)} apply only to method 'ngram', "
                "not 'draft_model'"
            )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SpeculativeConfig:
        """vLLM's dict spelling; the defaults of the module docstring fill missing keys."""
        unknown = sorted(str(key) for key in raw if key not in _KEYS)
        if unknown:
            raise ValueError(
                f"speculative_config: unsupported key(s) {', '.join(map(repr, unknown))}; "
                f"supported: {', '.join(_KEYS)}"
            )
        method, model = raw.get("method"), raw.get("model")
        if method is None:
            if model is None:
                raise ValueError(f"speculative_config needs 'method' (one of {', '.join(METHODS)})")
            method = "ngram" if model in _NGRAM_MODEL_NAMES else "draft_model"
        if method == "[ngram]":
            method = "ngram"
        if method == "ngram" and model in _NGRAM_MODEL_NAMES:
            model = None
        if raw.get("num_speculative_tokens") is None:
            raise ValueError("speculative_config needs 'num_speculative_tokens'")
        low, high = raw.get("prompt_lookup_min"), raw.get("prompt_lookup_max")
        if method == "ngram":
            if low is None and high is None:
                low = high = DEFAULT_PROMPT_LOOKUP
            elif low is None:
                low = high
            elif high is None:
                high = low
        return cls(
            method=method,
            num_speculative_tokens=raw["num_speculative_tokens"],
            model=model,
            prompt_lookup_min=low,
            prompt_lookup_max=high,
        )


def parse_speculative_config(
    value: SpeculativeConfig | Mapping[str, Any] | str | None,
) -> SpeculativeConfig | None:
    """``None`` (speculation off), a config, a dict, or its JSON text (as the command line
    passes it) -> a checked :class:`SpeculativeConfig`, or None. JSON text over
    :data:`MAX_CONFIG_TEXT_BYTES` is refused before it is parsed."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        if len(value) > MAX_CONFIG_TEXT_BYTES or len(value.encode()) > MAX_CONFIG_TEXT_BYTES:
            raise ValueError(
                f"speculative_config: the JSON text is over {MAX_CONFIG_TEXT_BYTES} bytes"
            )
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as error:
            raise ValueError(f"speculative_config is not valid JSON: {error}") from None
        if value is None:
            return None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"speculative_config must be a JSON object (a dict); got {type(value).__name__}"
        )
    return SpeculativeConfig.from_dict(value)


def _method_error(method: object) -> str:
    if method in _UNSUPPORTED_METHODS or (isinstance(method, str) and method.endswith("_mtp")):
        what = f"method {method!r} is not supported yet"
    else:
        what = f"unknown method {method!r}"
    return f"speculative_config: {what}; supported: {', '.join(METHODS)}"


def _check_int(name: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]`` (bools and floats are refused, as JSON
    ``true`` or ``4.0`` would otherwise slip through)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"speculative_config: {name} must be an integer; got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"speculative_config: {name}={value} is out of range [{low}, {high}]")
    return value


def check_speculation(config: SpeculativeConfig, async_scheduling: bool | None) -> None:
    """Refuse what the engine cannot do with ``config`` (before any process starts):
    asynchronous scheduling asked for explicitly (proposals read the tokens the last step
    accepted, so steps run in order; unset, it is simply off)."""
    if async_scheduling:
        raise ValueError(
            "speculative decoding runs steps in order: it cannot be combined with "
            "async_scheduling=True (--async-scheduling)"
        )
