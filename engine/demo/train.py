"""Train Metroline's embedded demo model on the Python standard library's own source code.

The corpus is every ``.py`` file of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), in sorted path order, minus ``site-packages`` and, by
default, the test suites and the generated ``pydoc_data`` prose. About 5% of the files, chosen by
a CRC-32 of their relative path (so the split does not depend on which other files exist), are
held out for evaluation. The script then

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
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

log = logging.getLogger("metroline.engine.demo.train")

EOS = "<|endoftext|>"
PROMPT = "def fibonacci(n):"
# A plain "Role: content" transcript; the model never saw chat data, but the chat endpoint works.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_EXCLUDE = ("site-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__")


@dataclass(frozen=True)
class Document:
    """One source file of the corpus."""

    path: str  # relative to the stdlib root, POSIX separators
    text: str


def stdlib_documents(root: pathlib.Path, exclude: Sequence[str]) -> list[Document]:
    """Read every ``.py`` file under ``root`` whose path has no folder named in ``exclude``.

    Files are returned in sorted relative-path order; files that are not valid UTF-8 are skipped.
    """
    excluded = set(exclude)
    docs: list[Document] = []
    skipped = 0
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if excluded.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        if text.strip():
            docs.append(Document(rel.as_posix(), text))
    log.info("corpus: %d files, %d chars from %s (%d non-UTF-8 skipped)",
             len(docs), sum(len(d.text) for d in docs), root, skipped)
    return docs


def is_heldout(doc: Document, heldout_per_mille: int) -> bool:
    """Whether ``doc`` belongs to the held-out split (stable per path, independent of the set)."""
    return zlib.crc32(doc.path.encode()) % 1000 < heldout_per_mille


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ``<|endoftext|>`` as EOS, BOS and pad token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def encode_stream(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """Encode ``texts`` into one 1-D token stream, each document followed by EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by the command line."""
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to ``--lr``, then cosine decay to ``--lr * --min-lr-ratio``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_at(stream: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` tokens from ``stream``."""
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    stream: torch.Tensor,
    seq_len: int,
    batch: int,
    max_windows: int | None = None,
    autocast: bool = False,
) -> float:
    """Mean loss in nats/token over consecutive windows of ``stream`` (each token scored once)."""
    was_training = model.training
    model.eval()
    n_windows = (stream.numel() - 1) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    total, count = 0.0, 0
    for first in range(0, n_windows, batch):
        idx = range(first, min(first + batch, n_windows))
        windows = torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), windows[:, 1:].flatten(), reduction="sum"
        )
        total += loss.item()
        count += windows[:, 1:].numel()
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def complete(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, max_new: int
) -> str:
    """Greedy completion of ``prompt`` (the prompt included), as the server would produce it."""
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def write_compat_keys(out: pathlib.Path) -> None:
    """Add the keys older ``transformers`` (4.x) and plain-JSON readers look for.

    ``save_pretrained`` from transformers 5 writes ``dtype``, ``rope_parameters``, a separate
    ``chat_template.jinja`` and ``tokenizer_class: TokenizersBackend``; this adds ``torch_dtype``,
    ``rope_theta``, the chat template in ``tokenizer_config.json`` and the class name every
    version knows, ``PreTrainedTokenizerFast``. Newer versions read both spellings.
    """
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("torch_dtype", config.get("dtype"))
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    tok_config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        chat_template=CHAT_TEMPLATE,
        add_bos_token=False,
        add_eos_token=False,
    )
    tok_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the settings the shipped checkpoint used."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, required=True, help="checkpoint folder to write")
    p.add_argument("--stdlib", type=pathlib.Path, default=None,
                   help="corpus root (default: sysconfig stdlib of this interpreter)")
    p.add_argument("--exclude-dir", nargs="*", default=list(DEFAULT_EXCLUDE),
                   help="skip files under folders with these names")
    p.add_argument("--heldout-per-mille", type=int, default=50, help="held-out share of files")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="windows per optimiser step")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--no-autocast", action="store_true", help="train in fp32, not bf16 autocast")
    p.add_argument("--max-mb", type=float, default=25.0,
                   help="save fp32 if the weights fit in this many MB (10^6 bytes), else bf16")
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
    docs = stdlib_documents(root, args.exclude_dir)
    train_docs = [d for d in docs if not is_heldout(d, args.heldout_per_mille)]
    held_docs = [d for d in docs if is_heldout(d, args.heldout_per_mille)]
    log.info("split: %d train files, %d held-out files", len(train_docs), len(held_docs))

    tokenizer = train_tokenizer([d.text for d in train_docs], args.vocab_size)
    train_stream = encode_stream(tokenizer, [d.text for d in train_docs])
    held_stream = encode_stream(tokenizer, [d.text for d in held_docs])
    train_bytes = sum(len(d.text.encode()) for d in train_docs)
    log.info("tokenizer: vocab %d; train %d tokens (%.2f bytes/token), held-out %d tokens",
             len(tokenizer), train_stream.numel(), train_bytes / train_stream.numel(),
             held_stream.numel())

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, config %s", n_params / 1e6,
             json.dumps({k: getattr(model.config, k) for k in (
                 "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings")}))

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    forward = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(args.seed)
    autocast = not args.no_autocast
    tokens_per_step = args.batch * args.seq_len
    log.info("training: %d steps x %d tokens = %.1fM tokens (%.2f epochs)", args.steps,
             tokens_per_step, args.steps * tokens_per_step / 1e6,
             args.steps * tokens_per_step / train_stream.numel())

    model.train()
    train_started = time.monotonic()
    smooth = None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        windows = batch_at(train_stream, args.seq_len, args.batch, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = forward(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        done = step + 1
        if done % 25 == 0 or done == 1:
            elapsed = time.monotonic() - train_started
            log.info("step %d/%d loss %.3f (smoothed %.3f) lr %.2e %.0f tok/s elapsed %.1f min",
                     done, args.steps, loss.item(), smooth, lr_at(step, args),
                     done * tokens_per_step / elapsed, elapsed / 60)
        if done % args.eval_every == 0 and done != args.steps:
            held = evaluate(model, held_stream, args.seq_len, 32, max_windows=128,
                            autocast=autocast)
            log.info("step %d held-out loss (first 128 windows) %.3f nats/token", done, held)
    train_minutes = (time.monotonic() - train_started) / 60

    model.float()
    held = evaluate(model, held_stream, args.seq_len, 32)
    bits_per_byte = held * held_stream.numel() / math.log(2) / sum(
        len(d.text.encode()) for d in held_docs)
    log.info("final held-out loss %.4f nats/token (%.3f bits/byte, %d tokens)",
             held, bits_per_byte, held_stream.numel())
    sample = complete(model, tokenizer, PROMPT, args.sample_tokens)
    log.info("greedy completion of %r:\n%s", PROMPT, sample)

    save_dtype = torch.float32 if n_params * 4 <= args.max_mb * 1e6 else torch.bfloat16
    model.to(save_dtype)
    model.config.dtype = save_dtype
    eos = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    write_compat_keys(args.out)
    weights = (args.out / "model.safetensors").stat().st_size
    log.info("wrote %s: %.2fM parameters, %s weights %d bytes (%.2f MB)", args.out,
             n_params / 1e6, str(save_dtype).removeprefix("torch."), weights, weights / 1e6)
    log.info("training %.1f min, total %.1f min", train_minutes,
             (time.monotonic() - started) / 60)


if __name__ == "__main__":
    main()
