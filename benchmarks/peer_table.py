"""Metroline vs vLLM from one run's records: one JSON and one compact table.

``python -P benchmarks/peer_table.py RESULTS_DIR``

Reads the run's W1 records (``throughput.py --backend metroline`` and ``--backend vllm``, at
defaults and, where ``--vllm-arg`` was given, at equal settings), W3 (``decode.py``) and W6
(``peer_serve.py``) records, and writes ``<date>-<gpu>-peer-<model>.json`` with both
versions, the card, every run's figure, the medians and the ratios; then prints the table.
Only records of one card are compared (a directory holding two cards is an error).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import save_record


def load_records(directory: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(directory.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("benchmark") in (
            "throughput", "decode-W3", "serve-W6",
        ):  # fmt: skip
            records.append(record | {"_file": path.name})
    return records


def card_of(record: dict[str, Any]) -> str:
    return record.get("environment", {}).get("gpu") or record.get("gpu") or "unknown"


def precision_of(record: dict[str, Any]) -> str:
    """"" for the model dtype; "-fp8" for fp8 weights and KV, "-fp8w" / "-fp8kv" for one."""
    parameters = record.get("parameters", {})
    weights = parameters.get("quantization") == "fp8"
    kv = parameters.get("kv_cache_dtype", "auto") not in ("auto", None)
    return {(False, False): "", (True, True): "-fp8", (True, False): "-fp8w"}.get(
        (weights, kv), "-fp8kv"
    )


W1_CONFIGS = ("metroline", "vllm", "vllm-equal", "metroline-fp8", "vllm-fp8")


def w1_runs(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """W1 output tok/s per configuration: metroline, vllm (defaults), vllm-equal, and each
    with its precision suffix (:func:`precision_of`)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r["benchmark"] != "throughput" or r["workload"]["name"] != "W1":
            continue
        for backend in ("metroline", "vllm"):
            if backend not in r:
                continue
            key = "vllm-equal" if backend == "vllm" and r["parameters"].get("vllm_arg") else backend
            key += precision_of(r)
            result = r[backend]
            runs.setdefault(key, []).append(
                {
                    "file": r["_file"],
                    "output_tokens_per_s": result["output_tokens_per_s"],
                    "roofline_fraction": result.get("roofline", {}).get("fraction_achieved"),
                    "init_s": result.get("init_s"),
                    "settings": result.get("settings")
                    or {
                        k: r["parameters"].get(k)
                        for k in ("max_num_seqs", "max_num_batched_tokens")
                    },
                }
            )
    return runs


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(values) if values else None


def build(records: list[dict[str, Any]]) -> dict[str, Any]:
    cards = {card_of(r) for r in records}
    if len(cards) != 1:
        raise SystemExit(f"records from {len(cards)} cards: {sorted(cards)}; compare one card")
    peer: dict[str, Any] = {"benchmark": "peer", "gpu": cards.pop()}
    envs = [r["environment"] for r in records if "environment" in r]
    peer["versions"] = {
        "metroline_commit": next((e.get("commit") for e in envs), None),
        "vllm": next((e["vllm"] for e in envs if "vllm" in e), None)
        or next((r.get("vllm_version") for r in records if r.get("vllm_version")), None),
        "torch": next((e.get("torch") for e in envs), None),
        "triton": next((e.get("triton") for e in envs), None),
    }
    runs = w1_runs(records)
    w1 = {name: {"runs": rows, "median_output_tokens_per_s": median_of(rows, "output_tokens_per_s")}
          for name, rows in runs.items() if rows}  # fmt: skip
    def median(name: str) -> float | None:
        return w1.get(name, {}).get("median_output_tokens_per_s")

    for ours, theirs in (
        ("metroline", "vllm"),
        ("metroline", "vllm-equal"),
        ("metroline-fp8", "vllm-fp8"),
        ("metroline-fp8", "metroline"),
    ):
        if median(ours) and median(theirs):
            key = f"{ours}_over_{theirs}".replace("-", "_")
            w1[key] = median(ours) / median(theirs)
    if "metroline" in w1:
        w1["metroline"]["median_roofline_fraction"] = median_of(
            runs["metroline"], "roofline_fraction"
        )
    peer["W1"] = w1
    for r in records:
        if r["benchmark"] == "decode-W3":
            peer["W3" + precision_of(r)] = [
                {k: row.get(k) for k in ("batch", "context", "step_s_median", "weight_floor_s",
                                         "bandwidth_fraction")}
                for row in r["rows"] if "skipped" not in row
            ]  # fmt: skip
        if r["benchmark"] == "serve-W6":
            peer["W6"] = {
                engine: {k: r[engine].get(k) for k in ("rows", "start_to_serving_s", "error")}
                for engine in ("metroline", "vllm") if engine in r
            }  # fmt: skip
    return peer


def print_table(peer: dict[str, Any]) -> None:
    v = peer["versions"]
    print(f"\nMetroline {str(v['metroline_commit'])[:10]} vs vLLM {v['vllm']}, {peer['gpu']}")
    w1 = peer.get("W1", {})
    for name in W1_CONFIGS:
        if name in w1:
            runs = ", ".join(f"{r['output_tokens_per_s']:.0f}" for r in w1[name]["runs"])
            settings = w1[name]["runs"][0]["settings"]
            print(
                f"W1 {name:11s} median {w1[name]['median_output_tokens_per_s']:8.0f} out tok/s "
                f"(runs {runs}; seqs {settings.get('max_num_seqs')}, tokens "
                f"{settings.get('max_num_batched_tokens')})"
            )
    for key in [k for k in w1 if "_over_" in k]:
        print(f"W1 {key}: {w1[key]:.3f}x")
    if w1.get("metroline", {}).get("median_roofline_fraction"):
        print(f"W1 Metroline roofline fraction: {w1['metroline']['median_roofline_fraction']:.0%}")
    for key, row in [(k, row) for k in peer if k.startswith("W3") for row in peer[k]]:
        print(
            f"{key} B={row['batch']} C={row['context']}: {row['step_s_median'] * 1e3:.2f} ms, "
            f"{row['step_s_median'] / row['weight_floor_s']:.2f}x weight floor, "
            f"{row['bandwidth_fraction']:.0%} of copy bandwidth"
        )
    w6 = peer.get("W6", {})
    by_rate: dict[str, dict[str, dict[str, Any]]] = {}
    for engine, result in w6.items():
        for row in result.get("rows") or []:
            by_rate.setdefault(row["rate"], {})[engine] = row
    if by_rate:
        print("W6 rate: mean TTFT ms / mean TPOT ms / out tok/s  (metroline | vllm | ratio)")
    for rate, pair in by_rate.items():
        cells = []
        for key in ("mean_ttft_ms", "mean_tpot_ms", "output_throughput"):
            ours, theirs = (pair.get(e, {}).get(key) for e in ("metroline", "vllm"))
            ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
            cells.append(f"{ours or 0:.1f} | {theirs or 0:.1f} | {ratio}")
        print(f"W6 {rate:>4s}: " + "   ".join(cells))
    for engine, result in w6.items():
        if result.get("start_to_serving_s"):
            print(f"start to serving, {engine}: {result['start_to_serving_s']:.1f} s")
        if result.get("error"):
            print(f"W6 {engine} failed: {result['error'][:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    records = load_records(args.results)
    if not records:
        raise SystemExit(f"no W1, W3 or W6 records in {args.results}")
    peer = build(records)
    from common import gpu_slug

    model = next((r["parameters"].get("model") for r in records if "parameters" in r), "model")
    save_record(args.results, [gpu_slug(peer["gpu"]), "peer", str(model)], peer)
    print_table(peer)


if __name__ == "__main__":
    main()
