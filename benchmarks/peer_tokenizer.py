"""A tokenizer for a benchmark shape: a ``tokenizers`` WordLevel over ``t0 .. t{vocab-1}``.

Decoding ids gives ``"t5 t17 ..."`` and encoding that text gives the same ids back, so a load
generator that samples random ids, decodes them to a prompt and re-tokenises it (``vllm bench
serve``'s random dataset) sends exactly the prompt lengths it asked for, and both servers
detokenise what they generate. No special tokens: nothing is added to a prompt.
"""

from __future__ import annotations

from pathlib import Path


def write_word_level_tokenizer(directory: Path, vocab_size: int) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(str(directory))
    return directory
