"""What the peer source's loop half measures (the cluster KV pool): bytes pulled, blocks that failed
verification, and the latency of each pull (a Prometheus histogram, `kvrelay_kv_peer_pull_seconds`)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds (seconds) of the pull latency histogram's buckets; +Inf is implied.
PULL_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class PeerPullStats:
    pulled_bytes: int = 0  # bytes of blocks pulled and kept (verified where the lender sent sums)
    verify_failures: int = 0  # blocks whose bytes did not sum as the lender's (recomputed, never served)
    seconds_sum: float = 0.0
    # counts per bucket (not cumulative), the last one +Inf
    seconds_counts: list[int] = field(default_factory=lambda: [0] * (len(PULL_SECONDS_BUCKETS) + 1))

    def observe(self, seconds: float) -> None:
        self.seconds_counts[bisect.bisect_left(PULL_SECONDS_BUCKETS, seconds)] += 1
        self.seconds_sum += seconds
