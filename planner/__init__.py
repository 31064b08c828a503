"""The planner: sizes the prefill and decode pools from observed and predicted load (planner/README.md)."""
