"""Tier stores: G2 host memory, G3 local disk, G4 object store."""
