"""The model's ``generation_config.json`` sampling defaults (vLLM's ``--generation-config``,
plus ``do_sample: false`` as greedy), and the offline API's vLLM arguments: ``tokenizer``,
``revision``, ``trust_remote_code``, ``get_default_sampling_params()``."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from metroline.engine import LLM, SamplingParams
from metroline.engine.cli import build_parser
from metroline.engine.config import EngineArgs
from metroline.engine.generation_defaults import sampling_defaults

from .conftest import make_prompts

GREEDY_CONFIG = {
    "bos_token_id": 1,
    "eos_token_id": 0,
    "do_sample": False,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 50,  # Hugging Face's own default: not the model's choice
    "repetition_penalty": 1.0,
    "max_new_tokens": 5,
}


def _copy(tiny_checkpoint, tmp_path, name: str, generation_config: dict | None):
    directory = tmp_path / name
    shutil.copytree(tiny_checkpoint("llama"), directory)
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return directory


@pytest.fixture(scope="module")
def greedy_checkpoint(tiny_checkpoint, tmp_path_factory):
    return _copy(tiny_checkpoint, tmp_path_factory.mktemp("gen"), "greedy", GREEDY_CONFIG)


def _defaults(model, **kwargs) -> dict:
    return EngineArgs(model=str(model), **kwargs).create_config().model.generation_defaults


def test_sampling_defaults_are_read_as_vllm_does():
    assert sampling_defaults(GREEDY_CONFIG) == {"temperature": 0.0, "top_p": 0.9, "max_tokens": 5}
    sampled = {"do_sample": True, "temperature": 0.6, "top_k": 20, "min_p": 0.05, "top_p": 1.0}
    assert sampling_defaults(sampled) == {"temperature": 0.6, "top_k": 20, "min_p": 0.05}
    assert sampling_defaults({"repetition_penalty": 1.05, "max_new_tokens": 64.0}) == {
        "repetition_penalty": 1.05,
        "max_tokens": 64,
    }
    assert sampling_defaults({"eos_token_id": 2}) == {}


def test_generate_without_params_uses_the_models_defaults(greedy_checkpoint):
    llm = LLM(model=str(greedy_checkpoint), kv_cache_memory_bytes=4 * 2**20)
    assert llm.get_default_sampling_params() == SamplingParams(
        temperature=0.0, top_p=0.9, max_tokens=5
    )
    prompts = make_prompts([7, 20], seed=91)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, use_tqdm=False)]
    second = [o.outputs[0].token_ids for o in llm.generate(prompts, use_tqdm=False)]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert first == second == [o.outputs[0].token_ids for o in greedy]
    assert all(len(t) == 5 or t[-1] == 0 for t in first)


def test_generation_config_vllm_or_a_folder(greedy_checkpoint, tiny_checkpoint, tmp_path):
    assert _defaults(greedy_checkpoint, generation_config="vllm") == {}
    plain = tiny_checkpoint("llama")
    assert _defaults(plain) == {}  # save_pretrained wrote only token ids
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 20}))
    assert _defaults(greedy_checkpoint, generation_config=str(other)) == {
        "temperature": 0.6,
        "top_k": 20,
    }
    with pytest.raises(ValueError, match="holds none"):
        _defaults(plain, generation_config=str(tmp_path))


def test_an_out_of_range_default_names_the_file(tiny_checkpoint, tmp_path):
    bad = _copy(tiny_checkpoint, tmp_path, "bad", {"top_p": 0, "do_sample": True})
    with pytest.raises(ValueError, match=r"generation_config\.json: top_p must be in \(0, 1\]"):
        _defaults(bad)
    assert _defaults(bad, generation_config="vllm") == {}


def test_tokenizer_from_another_folder(tiny_checkpoint, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    source = tiny_checkpoint("llama")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, weights / name)
    config = EngineArgs(model=str(weights)).create_config()
    assert not config.model.has_tokenizer
    llm = LLM(model=str(weights), tokenizer=str(source), kv_cache_memory_bytes=2**22)
    reference = LLM(model=str(source), kv_cache_memory_bytes=2**22)
    params = SamplingParams(temperature=0, max_tokens=6)
    text = llm.generate("def wrap(text):", params, use_tqdm=False)[0].outputs[0]
    assert text == reference.generate("def wrap(text):", params, use_tqdm=False)[0].outputs[0]
    with pytest.raises(ValueError, match="tokenizer must be a folder holding tokenizer files"):
        EngineArgs(model=str(source), tokenizer=str(weights)).create_config()


def test_trust_remote_code(tiny_checkpoint, tmp_path, caplog):
    native = tiny_checkpoint("llama")
    with caplog.at_level(logging.WARNING, logger="metroline"):
        EngineArgs(model=str(native), trust_remote_code=True).create_config()
    assert "trust_remote_code=True is ignored: LlamaForCausalLM" in caplog.text
    custom = _copy(tiny_checkpoint, tmp_path, "custom", None)
    raw = json.loads((custom / "config.json").read_text())
    raw.update(architectures=["MyModelForCausalLM"], auto_map={"AutoModel": "my.MyModel"})
    (custom / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="custom model code is not supported"):
        EngineArgs(model=str(custom), trust_remote_code=True).create_config()
    with pytest.raises(ValueError, match="unsupported architecture"):
        EngineArgs(model=str(custom)).create_config()


def test_the_vllm_arguments_are_llm_kwargs_and_serve_flags(tiny_checkpoint):
    with pytest.raises(ValueError, match="revision"):  # a kwarg; it applies to hub ids only
        LLM(model=str(tiny_checkpoint("llama")), revision="main")
    serve = build_parser().parse_args(
        ["serve", "m", "--tokenizer", "t", "--trust-remote-code", "--generation-config", "vllm"]
    )
    assert (serve.tokenizer, serve.trust_remote_code, serve.generation_config) == (
        "t",
        True,
        "vllm",
    )
