"""Engine adapters, one package each."""
