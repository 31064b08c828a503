"""Tier stores: G2 host memory, G3 local disk, G4 object store, behind one `TierStore` interface.

See base.py for the contract every store keeps, policy.py for eviction/admission, and the README.
"""

from .base import EventCallback, TierStats, TierStore
from .disk import DiskStore
from .host import HostStore
from .object_store import ObjectStore, object_key, s3_store
from .policy import POLICIES, LRUPolicy, TinyLFUPolicy, make_policy

__all__ = [
    "POLICIES",
    "DiskStore",
    "EventCallback",
    "HostStore",
    "LRUPolicy",
    "ObjectStore",
    "TierStats",
    "TierStore",
    "TinyLFUPolicy",
    "make_policy",
    "object_key",
    "s3_store",
]
