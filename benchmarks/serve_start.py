"""Start to ``/ready`` of ``metroline serve``, and where the time goes.

``python -P benchmarks/serve_start.py --model llama3-8b --runs 2 [--out DIR]``

Starts the server ``--runs`` times on the shape (dummy weights, bf16, max_model_len 4096, the
word-level tokenizer of :mod:`peer_tokenizer`), as :mod:`peer_serve` does, and times the
launch to ``/ready`` answering 200. From each server log it reads the milestones (first log
line, uvicorn up, the core's weights loaded, the core ready, the server ready) as seconds
after the launch. The first run also fills the Triton cache, so the later runs are the warm
start the performance issue's target names. Needs the server's packages (``.whl``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_serve import server_command, wait_until_serving
from peer_tokenizer import write_word_level_tokenizer
from records import save_record
from serve import free_port, stop_server
from shapes import SHAPES, write_shape

#: Milestone -> a pattern of the log line that marks it (the first match counts).
MILESTONES = {
    "first_log_line": r" INFO ",
    "uvicorn_up": r"Uvicorn running on",
    "core_weights_loaded": r"metroline\.engine\.worker\.worker: loaded ",
    "core_ready": r"engine core ready",
    "server_ready": r"ready in [\d.]+ s",
}
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def milestones(log: Path, launched_at: float) -> dict[str, float]:
    """Seconds from the launch (wall clock) to each milestone found in ``log``."""
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        stamp = STAMP.match(line)
        if not stamp:
            continue
        when = dt.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for name, pattern in MILESTONES.items():
            if name not in found and re.search(pattern, line):
                found[name] = round(when - launched_at, 2)
    return found


def one_start(shape_dir: Path, model: str, log: Path, extra: str) -> dict:
    port = free_port()
    with open(log, "w") as server_log:
        launched_at = time.time()
        server = subprocess.Popen(
            server_command("metroline", shape_dir, model, port, extra),
            stdout=server_log,
            stderr=subprocess.STDOUT,
        )
    try:
        seconds = wait_until_serving(server, port, "metroline", log)
    finally:
        stop_server(server)
    return {"start_to_ready_s": round(seconds, 2), **milestones(log, launched_at)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--server-args", default="")
    parser.add_argument("--label", default="", help="a name for this tree, in the record")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shape_dir = write_shape(args.model, Path(tmp) / args.model)
        write_word_level_tokenizer(shape_dir, SHAPES[args.model]["vocab_size"])
        for run in range(args.runs):
            log = args.out / f"serve-start-{args.label or 'run'}-{run}.log"
            rows.append(one_start(shape_dir, args.model, log, args.server_args))
            print(f"start {run}: {rows[-1]}", flush=True)
    record = {"benchmark": "serve-start", "model": args.model, "label": args.label,
              "parameters": vars(args) | {"out": str(args.out)}, "runs": rows}  # fmt: skip
    save_record(args.out, ["serve-start", args.model, args.label or "run"], record)
    names = ["start_to_ready_s", *MILESTONES]
    print("run  " + "  ".join(f"{n:>20s}" for n in names))
    for run, row in enumerate(rows):
        print(f"{run:<4} " + "  ".join(f"{row.get(n, float('nan')):20.2f}" for n in names))


if __name__ == "__main__":
    main()
