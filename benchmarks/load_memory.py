"""Host memory while loading a sharded checkpoint at TP=1 and TP=2 (issue: each rank reads
only its shard).

``python -P benchmarks/load_memory.py [--device cpu|cuda] [--out DIR]``

Writes a real multi-file safetensors checkpoint (with ``model.safetensors.index.json``) of a
1.1B-parameter Llama shape in bf16, then starts the engine at each TP size and prints every
rank's peak resident memory. On CPU the ranks' weights live in host memory too, so the peak
includes the rank's own shard; on CUDA it is the loading overhead alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import save_record

from metroline.engine import LLM
from metroline.engine.checkpoint import parse_arch_config
from metroline.engine.models.loader import synthetic_checkpoint

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
}


def write_checkpoint(directory: Path, shard_bytes: int = 512 * 2**20) -> int:
    """Synthetic weights saved as several safetensors files plus an index; returns bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    arch = parse_arch_config(CONFIG)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    files = 0

    def flush() -> None:
        nonlocal shard, size, files
        if shard:
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(shard, str(directory / name))
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for name, tensor in synthetic_checkpoint(arch, seed=0, device=torch.device("cpu")):
        tensor = tensor.to(torch.bfloat16).contiguous()
        shard[name] = tensor
        size += tensor.numel() * 2
        total += tensor.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama-1b"
        checkpoint_bytes = write_checkpoint(path)
        for tp in (1, 2):
            llm = LLM(
                model=str(path),
                tensor_parallel_size=tp,
                device=args.device,
                max_model_len=1024,
                kv_cache_memory_bytes=64 * 2**20,
            )
            for report in llm.engine_core.executor.load_reports():
                rows.append({"tp": tp, **report})
            llm.shutdown()
            del llm
    record = {
        "benchmark": "load-memory",
        "device": args.device,
        "checkpoint_bytes": checkpoint_bytes,
        "rows": rows,
    }
    save_record(args.out, ["load-memory", args.device], record)
    print(
        f"\ncheckpoint {checkpoint_bytes / 2**30:.2f} GiB (bf16, several files), device "
        f"{args.device}"
    )
    print(
        f"{'TP':>3s} {'rank':>4s} {'params GiB':>10s} {'RSS before':>10s} {'peak RSS':>9s} "
        f"{'peak - before':>13s} {'load s':>7s}"
    )
    for r in rows:
        print(
            f"{r['tp']:3d} {r['rank']:4d} {r['param_bytes'] / 2**30:10.2f} "
            f"{r['rss_before_bytes'] / 2**30:10.2f} {r['peak_rss_bytes'] / 2**30:9.2f} "
            f"{(r['peak_rss_bytes'] - r['rss_before_bytes']) / 2**30:13.2f} "
            f"{r['seconds']:7.1f}"
        )


if __name__ == "__main__":
    main()
