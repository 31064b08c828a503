"""Models kvrelay builds itself: the deterministic tiny default (`tiny.py`)."""
