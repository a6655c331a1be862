"""A byte-level BPE tokenizer of a benchmark shape's vocabulary size, built without a corpus.

Grammar-constrained decoding costs depend on the vocabulary (xgrammar walks it to build
token masks), so the structured-output benchmark needs a vocabulary like a real one: every
byte, then text pieces. The pieces are every pair of the 95 printable ASCII characters
(space included), then triples (a pair followed by a character), in a fixed order, until
the vocabulary is full; each has its BPE merge. The shape's BOS and EOS ids are special
tokens. Like Llama 3's tokenizer it is GPT-2's byte-level scheme, so any text encodes.
"""

from __future__ import annotations

import itertools
from pathlib import Path


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (byte order)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_byte_level_tokenizer(directory: Path, vocab_size: int, bos_id: int, eos_id: int) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``; ids
    ``bos_id`` and ``eos_id`` are ``<|begin_of_text|>`` and ``<|end_of_text|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = _byte_symbols()
    alphabet = [symbols[b] for b in range(32, 127)]  # space (as GPT-2 writes it) to "~"
    specials = {bos_id: "<|begin_of_text|>", eos_id: "<|end_of_text|>"}
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    next_id = 0

    def take(piece: str, merge: tuple[str, str] | None) -> None:
        nonlocal next_id
        while next_id in specials:
            next_id += 1
        vocab[piece] = next_id
        next_id += 1
        if merge is not None:
            merges.append(merge)

    for symbol in symbols:
        take(symbol, None)
    pairs = [a + b for a, b in itertools.product(alphabet, repeat=2)]
    triples = ((pair, c) for pair, c in itertools.product(pairs, alphabet))
    pieces = itertools.chain(
        ((p, (p[0], p[1])) for p in pairs), ((p + c, (p, c)) for p, c in triples)
    )
    room = vocab_size - len(specials)
    for piece, merge in pieces:
        if len(vocab) >= room:
            break
        take(piece, merge)
    vocab.update({name: token_id for token_id, name in specials.items()})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(specials.values()))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=specials[bos_id],
        eos_token=specials[eos_id],
    )
    fast.save_pretrained(str(directory))
    return directory
