"""GPU check of the logits processing and prompt log-probs (issue 21) as served on CUDA:
asynchronous scheduling and CUDA graphs on, against the same engine eager and synchronous.

Each constrained request's tokens obey its constraint (logit_bias forcing a token,
allowed_token_ids, a single-token bad word never produced, min_tokens), the plain greedy
requests beside them get exactly the tokens they get alone, the served engine gives the same
tokens as the eager synchronous one, and prompt log-probs equal transformers' log_softmax of
the prompt (fp32 checkpoint).

Run from the repository root: ``python -P tests/gpu/sampling_extras_check.py`` (it also runs
on the CPU, where both engines run eagerly). Prints a table last, writes JSON to $OUT.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "gpu")]

from conftest import write_tiny_checkpoint  # noqa: E402
from gpu_helpers import release, report  # noqa: E402

from metroline.engine import LLM, SamplingParams  # noqa: E402

TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
MAX_TOKENS = 24


def prompts_of(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(2, 500, (5 + 7 * i,), generator=generator).tolist() for i in range(count)]


def single_token_word(llm: LLM, token_ids: list[int]) -> tuple[str, int] | None:
    """A word of ``token_ids`` that encodes to one token with and without a leading space."""
    tokenizer = llm.tokenizer
    for token in token_ids:
        word = tokenizer.decode([token]).strip()
        forms = [tokenizer.encode(w, add_special_tokens=False) for w in (word, " " + word)]
        if word and all(len(f) == 1 for f in forms) and forms[0] == [token]:
            return word, token
    return None


def constrained(llm: LLM, plain_tokens: list[list[int]]) -> list[tuple[str, SamplingParams]]:
    forced = plain_tokens[0][3]
    cases = [
        ("logit_bias", SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                      logit_bias={forced: 100.0})),
        ("allowed", SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                   allowed_token_ids=[7, 11, 13])),
        ("min_tokens", SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=20)),
    ]  # fmt: skip
    # The bad-word request runs on prompt 7 (4 plain rows, then the cases): ban a word its
    # unconstrained answer contains.
    word = single_token_word(llm, plain_tokens[7])
    if word is not None:
        cases.append(("bad_word", SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                 bad_words=[word[0]])))  # fmt: skip
    return cases


def holds(name: str, params: SamplingParams, tokens: list[int], banned: int | None) -> bool:
    if name == "logit_bias":
        (forced,) = params.logit_bias
        return all(t == int(forced) for t in tokens)
    if name == "allowed":
        return set(tokens) <= {7, 11, 13}
    if name == "min_tokens":
        return len(tokens) >= 20
    return banned not in tokens


def prompt_logprobs_error(llm: LLM, path: Path, prompt: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    (out,) = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    reference = torch.log_softmax(logits, -1)
    errors = [
        abs(entry[prompt[i]].logprob - reference[i - 1, prompt[i]].item())
        for i, entry in enumerate(out.prompt_logprobs)
        if entry is not None
    ]
    return max(errors)


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def main() -> None:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    results: dict[str, object] = {"gpu": gpu}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(Path(tmp) / "llama", "llama", **TINY)
        served = LLM(model=str(path), max_model_len=256)
        results["async_scheduling"] = served.engine_core.async_scheduling
        prompts = prompts_of(8)
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        plain = run(served, prompts, [greedy] * len(prompts))
        cases = constrained(served, plain)
        word = single_token_word(served, plain[7])
        banned = word[1] if word else None
        mixed_params = [greedy] * 4 + [p for _, p in cases]
        mixed_prompts = prompts[:4] + prompts[4 : 4 + len(cases)]
        mixed = run(served, mixed_prompts, mixed_params)
        results["plain rows beside constrained ones: tokens equal"] = mixed[:4] == plain[:4]
        for (name, params), tokens in zip(cases, mixed[4:]):
            results[f"{name}: constraint holds"] = holds(name, params, tokens, banned)
        results["prompt_logprobs: max |error| vs transformers"] = prompt_logprobs_error(
            served, path, prompts[5]
        )
        release(served)
        eager = LLM(model=str(path), max_model_len=256, enforce_eager=True, async_scheduling=False)
        results["served == eager synchronous"] = run(eager, mixed_prompts, mixed_params) == mixed
        release(eager)
    report(results, "sampling_extras_check", "logits processing on CUDA")
    error = results["prompt_logprobs: max |error| vs transformers"]
    flags = [v for k, v in results.items() if isinstance(v, bool) and k != "async_scheduling"]
    if not all(flags) or not error < 1e-3:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
