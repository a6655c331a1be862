"""Engine layers, written tensor-parallel-aware (plain layers at TP=1)."""
