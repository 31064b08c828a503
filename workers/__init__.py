"""Model workers: engines, executors and the embedded default model."""
