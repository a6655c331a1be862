"""Plots for docs/performance.md from the JSON files in benchmarks/results/.

``python -P benchmarks/plot.py`` (needs matplotlib, which the project itself does not).
Draws every W3 decode file (time per step and bandwidth fraction against batch size), every
W5 serving file (latency and throughput against request rate) and, for each run folder with
W1 runs at several TP sizes, W1 output throughput against TP size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "img"


def plot_decode(path: Path) -> Path:
    record = json.loads(path.read_text())
    rows = [r for r in record["rows"] if "skipped" not in r]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for context in sorted({r["context"] for r in rows}):
        points = sorted((r["batch"], r) for r in rows if r["context"] == context)
        batches = [b for b, _ in points]
        left.plot(
            batches, [r["step_s_median"] * 1e3 for _, r in points], "o-", label=f"C={context}"
        )
        right.plot(
            batches, [100 * r["bandwidth_fraction"] for _, r in points], "o-", label=f"C={context}"
        )
    floor = rows[0]["weight_floor_s"] * 1e3
    left.axhline(floor, color="grey", linestyle="--", label=f"weight-read floor {floor:.2f} ms")
    right.axhline(70, color="grey", linestyle="--", label="target 70%")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size (requests decoding)")
        axis.legend()
        axis.grid(alpha=0.3)
    left.set_ylabel("time per decode step (ms)")
    right.set_ylabel("% of measured copy bandwidth")
    gpu = record["environment"]["gpu"]
    mode = "eager" if record["parameters"].get("enforce_eager") else "CUDA graphs"
    figure.suptitle(f"W3 decode, {record['parameters']['model']}, {gpu}, {mode}")
    return save_figure(figure, path)


def plot_serve(path: Path) -> Path:
    record = json.loads(path.read_text())
    rows = record["rows"]
    rates = [r["rate"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for q in (50, 99):
        left.plot(rates, [r[f"ttft_p{q}_s"] for r in rows], "o-", label=f"TTFT p{q}")
        left.plot(rates, [r[f"tpot_p{q}_s"] for r in rows], "s--", label=f"TPOT p{q}")
    left.axhline(2.0, color="grey", linestyle=":", label="2 s")
    left.set_yscale("log")
    left.set_ylabel("seconds")
    right.plot(rates, [r["output_tokens_per_s"] for r in rows], "o-")
    right.set_ylabel("output tokens/s")
    for axis in (left, right):
        axis.set_xlabel("request rate (requests/s, Poisson)")
        axis.grid(alpha=0.3)
    left.legend()
    figure.suptitle(f"W5 serving, {record['model']}, {record.get('gpu', '?')}")
    return save_figure(figure, path)


def plot_w1_scaling(folder: Path) -> Path | None:
    """W1 output tok/s against TP size, one line per (shape, mixed-step graphs on/off)."""
    lines: dict[str, list[tuple[int, float]]] = {}
    gpu = "?"
    for path in sorted(folder.glob("*-W1-*-metroline*.json")):
        record = json.loads(path.read_text())
        run, params = record["metroline"], record["parameters"]
        gpu = record["environment"]["gpu"]
        graphs = "mixed-step graphs" if run.get("mixed_step_graphs") else "eager mixed steps"
        label = f"{params['model']}, {graphs}"
        lines.setdefault(label, []).append((params["tp"], run["output_tokens_per_s"]))
    if len({tp for points in lines.values() for tp, _ in points}) < 2:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for index, (label, points) in enumerate(sorted(lines.items())):
        points.sort()
        axis.plot([tp for tp, _ in points], [v for _, v in points], "o-", label=label)
        offset = (6, 4) if index % 2 == 0 else (6, -12)  # lines meeting at TP=1 stay legible
        for tp, value in points:
            axis.annotate(f"{value:,.0f}", (tp, value), textcoords="offset points", xytext=offset)
    axis.set_xscale("log", base=2)
    axis.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    axis.set_xlabel("tensor-parallel size")
    axis.set_ylabel("W1 output tokens/s")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.suptitle(f"W1 throughput by TP size, {gpu} ({folder.name})", fontsize=10)
    return save_figure(figure, folder / "W1-tp-scaling.json")


def save_figure(figure: Any, path: Path) -> Path:
    """Save the plot of result file ``path`` under docs/img/ and close it."""
    figure.tight_layout()
    out = IMAGES / image_name(path)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def image_name(path: Path) -> str:
    """``<file>.png``, prefixed with its run folder's name when it sits in one (the same file
    name recurs across leases)."""
    folder = path.parent.relative_to(RESULTS)
    return "-".join([*folder.parts, path.stem]) + ".png" if folder.parts else path.stem + ".png"


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(RESULTS.glob("**/*-W3-*.json")):
        if sum("skipped" not in r for r in json.loads(path.read_text())["rows"]) > 1:
            written.append(plot_decode(path))
    for path in sorted(RESULTS.glob("**/*-W5-*.json")):
        written.append(plot_serve(path))
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        if (image := plot_w1_scaling(folder)) is not None:
            written.append(image)
    sys.stdout.write("".join(f"{p.relative_to(ROOT)}\n" for p in written))


if __name__ == "__main__":
    main()
