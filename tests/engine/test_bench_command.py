"""``metroline bench NAME ...`` runs the packaged benchmark scripts with their own options."""

from __future__ import annotations

import pytest

from metroline.engine.bench import BENCHMARKS, script_path
from metroline.engine.cli import main


def test_every_listed_benchmark_is_a_packaged_script():
    for name in BENCHMARKS:
        assert script_path(name).is_file()
    assert script_path("kernels").name == "kernel_bench.py"


@pytest.mark.parametrize("name", ["throughput", "decode", "serve"])
def test_bench_passes_its_arguments_to_the_script(name, capsys):
    assert main(["bench", name, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: {name}.py" in out and "--model" in out


def test_bench_rejects_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "nope"])
    assert stop.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_a_benchmark_stopping_with_a_message_shows_it(tmp_path, monkeypatch, capsys):
    from metroline.engine import bench

    (tmp_path / "serve.py").write_text("raise SystemExit('server exited with 3')\n")
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path)
    assert main(["bench", "serve"]) == 1
    assert "server exited with 3" in capsys.readouterr().err
