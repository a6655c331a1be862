"""Prompts in, engine-core requests out: tokenise, validate, fan out ``n`` sequences."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..checkpoint import PromptTooLongError, make_encoder
from ..config import EngineConfig
from ..messages import EngineCoreRequest
from ..sampling_params import SamplingParams
from ..structured_outputs import check_grammar
from ..validation import validate_request

__all__ = ["InputProcessor", "ProcessedPrompt", "PromptTooLongError", "PromptType"]

#: A prompt: text, token ids, or a dict with "prompt" or "prompt_token_ids".
PromptType = str | list[int] | dict[str, Any]


@dataclass
class ProcessedPrompt:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    #: One core request per sequence (``n`` of them); ids are ``"{i}_{request_id}"`` when n>1.
    core_requests: list[EngineCoreRequest]


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        eos = list(config.model.arch.eos_token_ids)
        tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
        if tokenizer_eos is not None and tokenizer_eos not in eos:
            eos.append(tokenizer_eos)
        self.eos_token_ids = tuple(eos)
        self.encode = make_encoder(tokenizer) if tokenizer is not None else None

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """The prompt's text (if given as text) and token ids. Raises ``ValueError``; for a
        text too long for ``max_model_len``, :class:`PromptTooLongError`."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "this model has no tokenizer files: give prompts as token id lists"
                )
            # A prompt must leave room for one generated token.
            return prompt, self.encode(prompt, True, self.config.model.max_model_len - 1)
        if isinstance(prompt, (list, tuple)):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ValueError("a token-id prompt must be a list of integers")
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids; got {type(prompt)}")

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float,
    ) -> ProcessedPrompt:
        """Raises ``ValueError`` for anything the engine would refuse; changes nothing."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams; got {type(params)}")
        text, token_ids = self.tokenize(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer; this model has none")
            check_grammar(params.structured_outputs)
        bad_words: tuple[tuple[int, ...], ...] = ()
        if params.bad_words:
            if self.encode is None:
                raise ValueError("bad_words need a tokenizer; this model has none")
            bad_words = bad_words_token_ids(params.bad_words, self.encode)
        # With prefix caching off, the n sequences still share the prompt's blocks: a salt
        # unique to this request makes only its siblings hash alike.
        salt = request_id if params.n > 1 and not self.config.cache.enable_prefix_caching else None
        core_requests = []
        for index in range(params.n):
            child_params = params
            if params.n > 1:
                seed = params.seed + index if params.seed is not None else None
                # The siblings share one prompt: the first alone computes its log-probs.
                prompt_logprobs = params.prompt_logprobs if index == 0 else None
                child_params = params.clone(n=1, seed=seed, prompt_logprobs=prompt_logprobs)
            core_id = request_id if params.n == 1 else f"{index}_{request_id}"
            core_requests.append(
                EngineCoreRequest(
                    request_id=core_id,
                    prompt_token_ids=token_ids,
                    sampling_params=child_params,
                    eos_token_ids=self.eos_token_ids,
                    arrival_time=arrival_time,
                    cache_salt=salt,
                    bad_words_token_ids=bad_words,
                )
            )
        validate_request(core_requests[0], self.config)
        return ProcessedPrompt(request_id, text, token_ids, params, core_requests)


def bad_words_token_ids(
    words: tuple[str, ...], encode: Callable[[str, bool, int | None], list[int]]
) -> tuple[tuple[int, ...], ...]:
    """Each word's token ids as it would start the text, and (as vLLM does) as it would
    follow a space when that makes a different first token of the same count: a word is
    banned both at the start and in the middle of the text."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(encode(word.lstrip(), False, None))
        spaced = tuple(encode(" " + word.lstrip(), False, None))
        variants = [plain]
        if plain and len(spaced) == len(plain) and spaced[0] != plain[0]:
            variants.append(spaced)
        sequences += [ids for ids in variants if ids and ids not in sequences]
    return tuple(sequences)
