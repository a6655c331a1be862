"""``python -m metroline.operator``."""

from metroline.operator.main import main

main()
