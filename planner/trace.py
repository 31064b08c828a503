"""Request traces for `kvrelay planner simulate`: Mooncake JSONL (`timestamp` ms, `input_length`,
`output_length`, optional `hash_ids`), the format perf/'s `trace` workload replays; and a bursty trace
generator (a steady base rate with periodic bursts), deterministic given its seed."""

from __future__ import annotations

import random

import msgspec


class TraceRequest(msgspec.Struct, frozen=True):
    timestamp: float  # ms from the trace's start
    input_length: int
    output_length: int
    hash_ids: list[int] = []


def read_trace(path: str) -> list[TraceRequest]:
    decoder = msgspec.json.Decoder(TraceRequest)
    with open(path, "rb") as f:
        records = [decoder.decode(line) for line in f if line.strip()]
    return sorted(records, key=lambda r: r.timestamp)


def bursty_trace(duration_s: float = 240.0, base_rate: float = 2.0, burst_rate: float = 8.0,
                 burst_every_s: float = 60.0, burst_len_s: float = 20.0, isl: int = 1024, osl: int = 128,
                 seed: int = 0) -> list[TraceRequest]:
    """Poisson arrivals at `base_rate`, `burst_rate` for `burst_len_s` at the end of every `burst_every_s`;
    lengths uniform in [0.5, 1.5] x the means."""
    rnd = random.Random(seed)
    out: list[TraceRequest] = []
    t = 0.0
    while True:
        in_burst = (t % burst_every_s) >= burst_every_s - burst_len_s
        t += rnd.expovariate(burst_rate if in_burst else base_rate)
        if t >= duration_s:
            return out
        out.append(TraceRequest(timestamp=round(t * 1000, 3), input_length=int(isl * rnd.uniform(0.5, 1.5)),
                                output_length=max(2, int(osl * rnd.uniform(0.5, 1.5)))))


def write_trace(records: list[TraceRequest], path: str) -> None:
    with open(path, "wb") as f:
        for r in records:
            f.write(msgspec.json.encode(r) + b"\n")
