"""Runtime planes: discovery, events, request plane, config."""
