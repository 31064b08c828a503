"""Mocker engine: protocol, deterministic tokens, prefix cache and KV events, frees, timing, limits, and
`kvrelay serve --engine mocker --workers 16` end to end."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kvrelay.runtime.discovery import DiscoveryConfig
from kvrelay.workers.api.errors import EngineError, EngineOverloaded
from kvrelay.workers.api.messages import EngineOutput, EngineRequest, SamplingParams
from kvrelay.workers.config import WorkerConfig
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.mocker import MockerConfig, MockerEngine
from kvrelay.workers.engines.mocker.config import DEFAULT_MAX_MODEL_LEN
from kvrelay.workers.models.tiny import ensure_tiny_model
from kvrelay.workers.protocol import Engine
from kvrelay.workers.worker import build_engine
from tests.e2e.serve import Serve, alive, wait_idle


@pytest.fixture(scope="module")
def model() -> str:
    return str(ensure_tiny_model())


def mocker(model: str, **kw) -> MockerEngine:
    """A mocker at `speedup` 0; engine-limit keywords (block_size, max_num_seqs, ...) go to its limits."""
    names = {f.name for f in dataclasses.fields(EngineLimits)}
    limits = EngineLimits(**{k: v for k, v in kw.items() if k in names}).for_model(DEFAULT_MAX_MODEL_LEN)
    return MockerEngine(MockerConfig(model=model, limits=limits,
                                     **{"speedup": 0.0, **{k: v for k, v in kw.items() if k not in names}}))


def prompt(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 2048) for _ in range(length)]


async def run(engine: MockerEngine, tokens: list[int], max_tokens: int = 8, rid: str = "r",
              **sampling) -> list[EngineOutput]:
    req = EngineRequest(request_id=rid, prompt_token_ids=tokens,
                        sampling=SamplingParams(max_tokens=max_tokens, **sampling))
    return [o async for o in engine.generate(req)]


def ids(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def test_imports_no_torch():
    code = ("import sys, kvrelay.workers.engines.mocker, kvrelay.workers.worker, kvrelay.cli.main; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "the mocker path imported torch"


async def test_protocol_layout_and_worker_wiring(model):
    engine = mocker(model)
    assert isinstance(engine, Engine)
    assert engine.fingerprint.startswith("mocker-") and engine.max_model_len == 8192
    layout = engine.kv_layout()
    assert (layout.device, layout.num_blocks, layout.num_layers) == ("mock", 16384, 4)
    assert layout.dtype == "float32"
    built = build_engine(WorkerConfig(engine="mocker", mocker_speedup=7.0, mocker_num_blocks=99), model)
    assert isinstance(built, MockerEngine) and built.cfg.speedup == 7.0 and built.pool.num_blocks == 99
    defaults = MockerConfig(model=model)
    for name in (n for n in vars(WorkerConfig()) if n.startswith("mocker_")):
        if name != "mocker_num_blocks":
            assert getattr(WorkerConfig(), name) == getattr(defaults, name.removeprefix("mocker_")), name
    assert WorkerConfig().mocker_num_blocks == defaults.num_blocks
    # transfer time: bytes / bandwidth, divided by the speedup
    t = build_engine(WorkerConfig(engine="mocker", mocker_speedup=2.0, mocker_transfer_gbps=8.0), model)
    assert t.simulated_transfer_seconds(10) == pytest.approx(10 * layout.block_bytes / 1e9 / 2)


async def test_tokens_are_deterministic_across_engines_and_survive_migration(model):
    a, b, other_seed = mocker(model), mocker(model), mocker(model, seed=1)
    for e in (a, b, other_seed):
        await e.start()
    p = prompt(50)
    first = ids(await run(a, p, 20))
    assert len(first) == 20 and all(t >= 4 for t in first)  # exact length; special ids never generated
    assert ids(await run(b, p, 20)) == first  # another worker, same tokens
    assert ids(await run(other_seed, p, 20)) != first
    # a request migrated after 7 tokens continues with exactly the tokens the first worker would give
    assert ids(await run(b, p + first[:7], 13, rid="migrated")) == first[7:]
    outs = await run(a, p, 3, rid="lp", logprobs=True)
    assert all(o.logprobs and all(-2.1 < x < 0 for x in o.logprobs) for o in outs)
    assert [o.finish_reason for o in outs] == [None, None, "length"]
    for e in (a, b, other_seed):
        await e.close()


async def test_eos_and_stop_tokens(model):
    e = mocker(model, eos_probability=1.0)
    await e.start()
    outs = await run(e, prompt(10), 5)
    assert ids(outs) == [1] and outs[-1].finish_reason == "stop"  # EOS (id 1 in the tiny model)
    assert len(ids(await run(e, prompt(10), 5, rid="x", ignore_eos=True))) == 5
    plain = mocker(model)
    await plain.start()
    tokens = ids(await run(plain, prompt(10), 5))
    outs = await run(plain, prompt(10), 5, rid="s", stop_token_ids=[tokens[2]])
    assert ids(outs) == tokens[:3] and outs[-1].finish_reason == "stop"
    await e.close()
    await plain.close()


async def test_min_tokens_and_top_logprobs(model):
    """The mocker has no distribution: min_tokens holds back its EOS, top_logprobs gives k made-up
    alternatives with the chosen token first (its logprob), the other parameters are accepted and ignored."""
    e = mocker(model, eos_probability=1.0)
    await e.start()
    outs = await run(e, prompt(10), 9, min_tokens=4)
    assert len(ids(outs)) == 5 and ids(outs)[-1] == 1 and 1 not in ids(outs)[:4]  # EOS as the 5th token
    plain = mocker(model)
    await plain.start()
    base = ids(await run(plain, prompt(10), 6))
    outs = await run(plain, prompt(10), 6, rid="t", logprobs=True, top_logprobs=3, repetition_penalty=1.5,
                     frequency_penalty=1.0, presence_penalty=1.0, min_p=0.5, logit_bias={5: 100.0})
    assert ids(outs) == base
    tops = [t for o in outs for t in o.top_logprobs or []]
    lps = [lp for o in outs for lp in o.logprobs or []]
    assert [t.token_ids[0] for t in tops] == base and [t.logprobs[0] for t in tops] == lps
    assert all(len(t.token_ids) == 3 == len(set(t.token_ids)) and t.logprobs == sorted(t.logprobs, reverse=True)
               for t in tops)
    await e.close()
    await plain.close()


async def test_prefix_hit_is_reported(model):
    e = mocker(model)
    await e.start()
    p = prompt(200)
    cold = await run(e, p, 4, rid="a")
    warm = await run(e, p, 4, rid="b")
    assert cold[-1].num_cached_tokens == 0 and warm[-1].num_cached_tokens == 192  # 12 full blocks
    assert ids(cold) == ids(warm) and e.stats().prefix_hit_tokens == 192
    salted = [o async for o in e.generate(EngineRequest(request_id="c", prompt_token_ids=p, cache_salt="t2"))]
    assert salted[-1].num_cached_tokens == 0
    await e.close()


async def test_kv_events_track_the_pool_exactly_under_eviction_and_preemption(model):
    e = mocker(model, num_blocks=24, max_num_batched_tokens=64)
    held: set[int] = set()
    event_ids: list[int] = []
    kinds: set[str] = set()

    def sink(events):
        for ev in events:
            event_ids.append(ev.event_id)
            kinds.add(ev.kind)
            (held.update if ev.kind == "stored" else held.difference_update)(ev.seq_hashes)
        assert held == set(e.pool.cached)  # after every step, not only at the end

    e.subscribe_kv_events(sink)
    await e.start()
    shared = prompt(48, seed=99)  # common prefix: prefix hits and shared blocks
    reqs = [run(e, shared + prompt(30 + 7 * i, seed=i), 24, rid=f"r{i}") for i in range(10)]
    results = await asyncio.gather(*reqs)
    assert all(len(ids(r)) == 24 for r in results)
    assert e.stats().preemptions > 0, "the pool is too small not to preempt"
    assert event_ids == list(range(1, len(event_ids) + 1))
    assert kinds == {"stored", "removed"}, "the pool is too small not to evict"
    snap = await e.kv_snapshot()
    assert snap.last_event_id == event_ids[-1] and set(snap.tiers["G1"]) == held == set(e.pool.cached)
    assert e.pool.num_free == e.pool.num_blocks
    # preemption by recompute does not change the tokens
    roomy = mocker(model)
    await roomy.start()
    assert ids(await run(roomy, shared + prompt(30, seed=0), 24)) == ids(results[0])
    await e.close()
    await roomy.close()


async def test_abort_early_close_and_shutdown_free_every_block(model):
    e = mocker(model, speedup=1000.0, num_blocks=64)
    await e.start()
    gens = [e.generate(EngineRequest(request_id=f"g{i}", prompt_token_ids=prompt(100, seed=i),
                                     sampling=SamplingParams(max_tokens=10_000, ignore_eos=True)))
            for i in range(3)]
    for g in gens:
        await anext(g)
    assert e.stats().running == 3 and e.pool.num_free < e.pool.num_blocks
    await gens[0].aclose()  # consumer leaves early
    await e.abort("g1")
    rest = [o async for o in gens[1]]
    assert rest[-1].finish_reason == "abort"
    await e.close()  # in flight: the stream fails, its blocks are freed
    with pytest.raises(EngineError, match="shut down"):
        async for _ in gens[2]:
            pass
    assert e.pool.num_free == e.pool.num_blocks and e.stats().running == 0


async def test_limits_and_max_waiting(model):
    e = mocker(model, speedup=1.0, max_num_seqs=1, max_waiting=1, max_model_len=512)
    await e.start()
    for bad, match in (([], "at least one"), (prompt(512), "context"), ([5000], r"\[0, 2048\)")):
        with pytest.raises(EngineError, match=match):
            await run(e, bad)
    first = e.generate(EngineRequest(request_id="a", prompt_token_ids=prompt(20),
                                     sampling=SamplingParams(max_tokens=1000)))
    await anext(first)
    second = asyncio.create_task(run(e, prompt(20), 2, rid="b"))
    while e.stats().waiting == 0:
        await asyncio.sleep(0.001)
    with pytest.raises(EngineOverloaded, match="busy"):
        await run(e, prompt(20), rid="c")
    with pytest.raises(EngineError, match="duplicate"):
        await run(e, prompt(20), rid="a")
    await first.aclose()
    assert len(ids(await second)) == 2
    await e.close()


async def test_timing_model_sets_the_pace(model):
    slow = dict(prefill_us_per_token=200.0, decode_base_ms=20.0)
    e = mocker(model, speedup=1.0, **slow)
    await e.start()
    t0 = time.monotonic()
    await run(e, prompt(1000), 1)  # one prefill step of 1000 tokens, no decode
    prefill = e.timing.prefill_seconds(1000)
    assert prefill == pytest.approx(0.2 + 1000 * 1001 / 2 * 0.0005e-6)
    assert prefill * 0.95 <= time.monotonic() - t0 <= prefill + 0.25
    t0 = time.monotonic()
    await run(e, prompt(16, seed=5), 11, rid="d")  # a 16-token prefill, then 10 decode steps
    modeled = e.timing.prefill_seconds(16) + sum(e.timing.decode_seconds(1, 2) for _ in range(10))
    assert modeled * 0.95 <= time.monotonic() - t0 <= modeled + 0.25
    fast = mocker(model, speedup=100.0, **slow)
    await fast.start()
    t0 = time.monotonic()
    await run(fast, prompt(1000), 1)
    assert time.monotonic() - t0 < prefill / 100 + 0.05
    for engine in (e, fast):
        await engine.close()


def test_serve_16_mocker_workers_end_to_end(tmp_path: Path, model):
    srv = Serve(tmp_path, "--engine", "mocker", "--mocker-speedup", "100", workers=16)
    workers: list[int] = []
    try:
        srv.start(timeout=90)  # returns once one worker is registered
        while "with workers: 16 agg" not in srv.read_log():  # logged once every worker printed READY
            assert time.monotonic() - srv.started_at < 90, srv.read_log()
            time.sleep(0.05)
        ready = time.monotonic() - srv.started_at
        workers = srv.children()
        rss_mb = [int(next(ln for ln in Path(f"/proc/{p}/status").read_text().splitlines()
                           if ln.startswith("VmRSS")).split()[1]) / 1024 for p in workers]
        print(f"\n16 mocker workers ready in {ready:.1f}s; worker RSS mean "
              f"{sum(rss_mb) / len(rss_mb):.0f} MB, max {max(rss_mb):.0f} MB")

        async def load() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json={
                    "model": "kvrelay-tiny", "prompt": f"Request {i}: tell me a story", "max_tokens": 32,
                }) for i in range(64)))

        t0 = time.monotonic()
        replies = asyncio.run(load())
        print(f"64 concurrent completions in {time.monotonic() - t0:.2f}s")
        assert [r.status_code for r in replies] == [200] * 64, replies[0].text
        assert all(r.json()["usage"]["completion_tokens"] == 32 for r in replies)
        stats = asyncio.run(wait_idle(DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir),
                                    token=srv.internal_token))
        assert len(stats) == 16 and sum(s.generated_tokens for _, s in stats.values()) == 64 * 32
        assert all(s.used_blocks == 0 for _, s in stats.values())
        print(f"requests spread over {sum(1 for _, s in stats.values() if s.generated_tokens)} workers")
    finally:
        code = srv.stop()
    assert code == 0 and len(workers) == 16 and not [p for p in workers if alive(p)]
