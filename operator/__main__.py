"""``python -m metroline.operator``."""

from .main import main

main()
