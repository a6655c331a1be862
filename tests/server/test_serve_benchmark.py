"""The W5 load generator (benchmarks/serve.py) against a real `metroline serve` on the CPU:
every request streams, and the server's own request log is matched to the client's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_w5_runs_end_to_end_and_matches_the_server_log(tmp_path):
    command = [
        sys.executable, "-P", str(ROOT / "benchmarks" / "serve.py"), "--model", "tiny",
        "--rates", "20", "--num-requests", "3", "--min-seconds", "0.25", "--out", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (record_path,) = tmp_path.glob("*-W5-tiny.json")
    (row,) = json.loads(record_path.read_text())["rows"]
    assert row["requests"] == 5  # max(3, ceil(20 * 0.25))
    assert row["errors"] == 0 and row["server_matched"] == 5
    assert all(r[1] is not None and r[3] > 0 for r in row["per_request"])
    assert row["server_ttft_p99_s"] <= row["ttft_p99_s"]
    assert (tmp_path / "W5-tiny-server.log").read_text().count("request finished") >= 5
