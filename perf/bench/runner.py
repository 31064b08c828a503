"""Drive one benchmark: warm-up, then measured requests until --num-requests or --duration, with progress.

Warm-up requests (--warmup N) are random prompts of --input-len/--output-len from their own seed
stream, sent closed-loop before the measured start and excluded from every metric; they do not touch
the measured workload's prefixes, so its cache behaviour starts cold either way.
Stopping: the measured run dispatches requests until --num-requests were sent or --duration seconds
passed (whichever first; with neither, the workload's natural size), then waits for those in flight.
A multi-turn request waits until its session's previous turn has finished before it is sent; its
latencies count from the send.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from itertools import islice
from typing import TextIO

import numpy as np
from msgspec import structs
from tokenizers import Tokenizer

from kvrelay.perf.bench.arrivals import max_in_flight, schedule
from kvrelay.perf.bench.client import BenchClient, RequestRecord, discover_model
from kvrelay.perf.bench.config import BenchConfig
from kvrelay.perf.bench.metrics import BenchResult, summarize
from kvrelay.perf.bench.tokens import Renderer, token_pool
from kvrelay.perf.bench.workloads import RequestSpec, natural_size, random_workload, workload

WARMUP_SEED_OFFSET = 1_000_003


@dataclass
class _State:
    total: int | None
    duration: float | None
    started: float = 0.0
    dispatched: int = 0
    finished: int = 0
    failed: int = 0
    in_flight: int = 0


class Progress:
    """One stderr line redrawn with \\r on a terminal; elsewhere a plain line every `every_s` seconds."""

    def __init__(self, state: _State, stream: TextIO | None = None, enabled: bool = True, every_s: float = 10.0):
        self.state, self.stream, self.enabled = state, stream or sys.stderr, enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = 0.2 if self.tty else every_s
        self._width = 0

    def line(self) -> str:
        s = self.state
        elapsed = time.perf_counter() - s.started
        frac = (s.finished / s.total) if s.total else (min(1.0, elapsed / s.duration) if s.duration else 0.0)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        of = f"/{s.total}" if s.total else ""
        return (f"[{bar}] {s.finished}{of} done, {s.failed} failed, {s.in_flight} in flight, "
                f"{elapsed:6.1f}s, {s.finished / elapsed if elapsed > 0 else 0.0:.2f} req/s")

    def draw(self, final: bool = False) -> None:
        if self.enabled:
            line = self.line()
            self._width = max(self._width, len(line))  # pad over a longer previous line
            self.stream.write(("\r" + line.ljust(self._width)) if self.tty else (line + "\n"))
            if final and self.tty:
                self.stream.write("\n")
            self.stream.flush()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self.draw()


class Runner:
    def __init__(self, cfg: BenchConfig, client: BenchClient):
        self.cfg, self.client = cfg, client
        self._turn_done: dict[tuple[int, int], asyncio.Event] = {}
        self.state = _State(total=None, duration=None)

    def _turn_event(self, session: int, turn: int) -> asyncio.Event:
        return self._turn_done.setdefault((session, turn), asyncio.Event())

    async def _one(self, spec: RequestSpec, t0: float, records: list[RequestRecord]) -> None:
        if spec.session >= 0 and spec.turn > 0:
            await self._turn_event(spec.session, spec.turn - 1).wait()
            self._turn_done.pop((spec.session, spec.turn - 1), None)
        self.state.in_flight += 1
        try:
            rec = await self.client.send(spec, t0)
        finally:
            self.state.in_flight -= 1
            if spec.session >= 0:
                self._turn_event(spec.session, spec.turn).set()
        records.append(rec)
        self.state.finished += 1
        self.state.failed += not rec.ok

    def _may_dispatch(self, t0: float, limit: int | None, deadline: float | None) -> bool:
        if limit is not None and self.state.dispatched >= limit:
            return False
        return deadline is None or time.perf_counter() - t0 < deadline

    async def closed_loop(self, requests: Iterator[RequestSpec], workers: int, t0: float, limit: int | None,
                          deadline: float | None) -> list[RequestRecord]:
        records: list[RequestRecord] = []

        async def worker() -> None:
            while self._may_dispatch(t0, limit, deadline):
                spec = next(requests, None)
                if spec is None:
                    return
                self.state.dispatched += 1
                await self._one(spec, t0, records)

        await asyncio.gather(*(worker() for _ in range(workers)))
        return records

    async def open_loop(self, requests: Iterator[RequestSpec], cap: int | None, t0: float, limit: int | None,
                        deadline: float | None) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        slots = asyncio.Semaphore(cap) if cap else None
        tasks: list[asyncio.Task[None]] = []

        async def send(spec: RequestSpec) -> None:
            try:
                await self._one(spec, t0, records)
            finally:
                if slots is not None:
                    slots.release()

        for offset, spec in schedule(self.cfg, requests):
            if (limit is not None and self.state.dispatched >= limit) or (deadline is not None and offset >= deadline):
                break
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                await slots.acquire()
            self.state.dispatched += 1
            tasks.append(asyncio.create_task(send(spec)))
        await asyncio.gather(*tasks)
        return records

    async def warmup(self, pool: np.ndarray) -> int:
        n = self.cfg.warmup
        if n <= 0:
            return 0
        cfg = structs.replace(self.cfg, seed=self.cfg.seed + WARMUP_SEED_OFFSET, range_ratio=0.0)
        workers = min(n, max_in_flight(self.cfg) or n)
        await self.closed_loop(islice(random_workload(cfg, pool), n), workers, time.perf_counter(), n, None)
        self.state.dispatched = self.state.finished = self.state.failed = 0
        return n

    async def measure(self, requests: Iterator[RequestSpec], progress: Progress | None = None) -> list[RequestRecord]:
        cfg = self.cfg
        limit = cfg.num_requests if cfg.num_requests is not None else (
            natural_size(cfg) if cfg.duration is None else None)
        self.state.total, self.state.duration = limit, cfg.duration
        t0 = self.state.started = time.perf_counter()
        ticker = asyncio.create_task(progress.run()) if progress is not None else None
        try:
            if cfg.arrival_mode() == "closed":
                return await self.closed_loop(requests, max_in_flight(cfg) or 1, t0, limit, cfg.duration)
            return await self.open_loop(requests, max_in_flight(cfg), t0, limit, cfg.duration)
        finally:
            if progress is not None and ticker is not None:
                ticker.cancel()
                progress.draw(final=True)


def kvrelay_version() -> str:
    try:
        return version("kvrelay")
    except PackageNotFoundError:
        return "0+unknown"


async def run_benchmark(cfg: BenchConfig, tokenizer: Tokenizer, *, api_key: str = "",
                        progress: bool = True, progress_stream: TextIO | None = None) -> BenchResult:
    """The whole run against cfg.url; the caller writes the result (report.write)."""
    model = cfg.model or await discover_model(cfg.url, api_key)
    # resolved now: the result then says which arrivals ran, even after JSON turns a rate of inf into null
    cfg = structs.replace(cfg, model=model, arrivals=cfg.arrival_mode())
    pool = token_pool(tokenizer, cfg.prompt_format)
    cap = max_in_flight(cfg)
    client = BenchClient(cfg.url, Renderer(cfg, model, tokenizer), api_key=api_key, timeout=cfg.timeout,
                         max_connections=cap)
    runner = Runner(cfg, client)
    try:
        warm = await runner.warmup(pool)
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meter = Progress(runner.state, progress_stream, enabled=progress)
        records = await runner.measure(workload(cfg, pool), meter if progress else None)
    finally:
        await client.close()
    records.sort(key=lambda r: r.index)
    return BenchResult(kvrelay_version=kvrelay_version(), started_at=started_at, model=model, config=cfg,
                       summary=summarize(records, cfg.slo), warmup_requests=warm, records=records)
