"""Train Metroline's embedded demo model on the Python standard library's own source code.

The corpus is every ``.py`` file of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), in sorted path order, minus ``site-packages`` and, by
default, the test suites, the generated ``pydoc_data`` prose and the ``encodings`` package (mostly
generated codec tables). Unless ``--raw`` is given, each file is normalised by a round trip
through ``ast``: docstrings and comments are dropped and the code is re-printed by
``ast.unparse``, so a model this small spends its capacity on code rather than on English prose
(with docstrings, it answers ``def fibonacci(n):`` with a docstring that repeats itself). About
5% of the files, chosen by a CRC-32 of their relative path (so the split does not depend on which
other files exist), are held out for evaluation. The script then

1. trains a byte-level BPE tokenizer (``tokenizers``: ByteLevel pre-tokenizer and decoder, so any
   text round-trips) on the training files, with ``<|endoftext|>`` as its only special token
   (EOS, BOS and padding all at once; no BOS is added when encoding);
2. encodes each file followed by ``<|endoftext|>`` into one token stream per split;
3. trains a small ``LlamaForCausalLM`` on random windows of the training stream (AdamW, linear
   warmup then cosine decay, bf16 autocast on CPU, gradient clipping), seeded throughout;
4. reports the held-out loss in nats per token (every held-out token scored once, windows of
   ``--seq-len`` tokens, fp32) and a greedy completion of ``def fibonacci(n):``;
5. writes the checkpoint with ``save_pretrained``: weights in fp32 when they fit ``--max-mb``,
   otherwise bf16, with the config's ``dtype`` matching.

The steps live in sibling modules, one concern each: ``corpus`` (reading, normalising and
splitting the files), ``tokenization`` (the tokenizer and token streams), ``training`` (the model,
schedule and loop), ``evaluation`` (held-out loss, greedy completion) and ``saving`` (writing
the folder); this module holds the command line and runs them in order.

Run from the repository root (``-P`` keeps the folder ``operator/`` from shadowing the stdlib)::

    python -P -m metroline.engine.demo.train --out engine/demo/model --compile
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import sysconfig
import time
from collections.abc import Sequence

import torch

from .corpus import DEFAULT_EXCLUDE, is_heldout, stdlib_documents
from .evaluation import complete, evaluate
from .saving import save_checkpoint
from .tokenization import encode_stream, train_tokenizer
from .training import build_model, train

log = logging.getLogger("metroline.engine.demo.train")

PROMPT = "def fibonacci(n):"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the settings the shipped checkpoint used."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, required=True, help="checkpoint folder to write")
    p.add_argument(
        "--stdlib",
        type=pathlib.Path,
        default=None,
        help="corpus root (default: sysconfig stdlib of this interpreter)",
    )
    p.add_argument(
        "--exclude-dir",
        nargs="*",
        default=list(DEFAULT_EXCLUDE),
        help="skip files under folders with these names",
    )
    p.add_argument(
        "--raw", action="store_true", help="keep comments, docstrings and layout (no ast pass)"
    )
    p.add_argument("--heldout-per-mille", type=int, default=50, help="held-out share of files")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="windows per optimiser step")
    p.add_argument("--steps", type=int, default=3600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--no-autocast", action="store_true", help="train in fp32, not bf16 autocast")
    p.add_argument(
        "--max-mb",
        type=float,
        default=25.0,
        help="save fp32 if the weights fit in this many MB (10^6 bytes), else bf16",
    )
    p.add_argument("--sample-tokens", type=int, default=64)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Build the corpus and tokenizer, train, evaluate, and write the checkpoint."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.monotonic()

    root = args.stdlib or pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = stdlib_documents(root, args.exclude_dir, code_only=not args.raw)
    train_docs = [d for d in docs if not is_heldout(d, args.heldout_per_mille)]
    held_docs = [d for d in docs if is_heldout(d, args.heldout_per_mille)]
    log.info("split: %d train files, %d held-out files", len(train_docs), len(held_docs))

    tokenizer = train_tokenizer([d.text for d in train_docs], args.vocab_size)
    train_stream = encode_stream(tokenizer, [d.text for d in train_docs])
    held_stream = encode_stream(tokenizer, [d.text for d in held_docs])
    train_bytes = sum(len(d.text.encode()) for d in train_docs)
    log.info(
        "tokenizer: vocab %d; train %d tokens (%.2f bytes/token), held-out %d tokens",
        len(tokenizer),
        train_stream.numel(),
        train_bytes / train_stream.numel(),
        held_stream.numel(),
    )

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %.2fM parameters, config %s",
        n_params / 1e6,
        json.dumps(
            {
                k: getattr(model.config, k)
                for k in (
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "vocab_size",
                    "max_position_embeddings",
                )
            }
        ),
    )

    train_minutes = train(model, train_stream, held_stream, args)

    model.float()
    held = evaluate(model, held_stream, args.seq_len, 32)
    bits_per_byte = (
        held * held_stream.numel() / math.log(2) / sum(len(d.text.encode()) for d in held_docs)
    )
    log.info(
        "final held-out loss %.4f nats/token (%.3f bits/byte, %d tokens)",
        held,
        bits_per_byte,
        held_stream.numel(),
    )
    sample = complete(model, tokenizer, PROMPT, args.sample_tokens)
    log.info("greedy completion of %r:\n%s", PROMPT, sample)

    save_checkpoint(model, tokenizer, args.out, args.max_mb)
    log.info("training %.1f min, total %.1f min", train_minutes, (time.monotonic() - started) / 60)


if __name__ == "__main__":
    main()
