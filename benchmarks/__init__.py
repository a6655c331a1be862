"""Metroline's benchmarks (benchmarks/README.md), installed as ``metroline.benchmarks``.

Each module is a script: ``python -P benchmarks/throughput.py ...`` from a checkout, or
``metroline bench throughput ...`` wherever the package is installed (the engine's image
included). They import their siblings by plain name, so they run as files, never as
submodules.
"""
