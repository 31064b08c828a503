"""Structured outputs on the native engine: decode step time with a json_schema constraint vs without, at
batch 1 and 16, and grammar compile time cold vs cached over the schema set (perf/structured_schemas.py).

Step time: B requests with the same prompt, the constrained run's schema an object with one unbounded
string (the grammar never completes during the measured steps, so every row stays constrained); the mean
of the decode steps taken while all B rows were running, after `--warmup` of them. Compile: a fresh
`GrammarCache` per repeat; cold = compile (llguidance builds its lexer lazily, so the first mask is part of
a cold start and is timed with it), cached = the cache hit + the matcher copy + the first mask.

    python -m kvrelay.perf.structured_bench                       # tiny model
    python -m kvrelay.perf.structured_bench --model smollm2-135m-instruct --steps 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvrelay.perf.structured_schemas import SCHEMAS
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.api.structured import json_schema_output
from kvrelay.workers.engines.native import LLMEngine, NativeEngineConfig
from kvrelay.workers.engines.native.grammar_cache import GrammarCache
from kvrelay.workers.models.registry import resolve_model

LONG = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def step_time(engine: LLMEngine, batch: int, constrained: bool, steps: int, warmup: int, run: str) -> float:
    structured = json_schema_output(LONG) if constrained else None
    if structured is not None:
        engine.grammars.compile(structured)
    for i in range(batch):
        engine.add_request(EngineRequest(request_id=f"{run}-{i}", prompt_token_ids=list(range(5, 37)),
                                         sampling=SamplingParams(max_tokens=warmup + steps + 2, temperature=1.0,
                                                                 seed=i, ignore_eos=True, structured=structured)))
    times, decodes = [], 0
    while engine.has_work():
        full = len(engine.scheduler.running) == batch and not engine.scheduler.waiting
        t0 = time.perf_counter()
        engine.step()
        if full and decodes > 0:  # the first full step still prefills
            if decodes > warmup:
                times.append(time.perf_counter() - t0)
        decodes += full
    assert times, "no step ran with the whole batch: raise --steps"
    return statistics.mean(times)


def compile_times(tokenizer_json: Path, vocab: int, eos: tuple[int, ...], repeats: int) -> dict[str, float]:
    cold, cached = [], []
    for _ in range(repeats):
        cache = GrammarCache(tokenizer_json, vocab, eos)
        cache.tokenizer()  # built once per engine, not per schema
        mask = torch.empty((vocab + 31) // 32, dtype=torch.int32)
        for schema in SCHEMAS:
            s = json_schema_output(schema)
            t0 = time.perf_counter()
            cache.compile(s)
            cache.matcher(s).unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cache.compile(s)
            cache.matcher(s).unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            cached.append(time.perf_counter() - t0)
    return {"schemas": len(SCHEMAS), "cold_ms_mean": 1e3 * statistics.mean(cold),
            "cold_ms_max": 1e3 * max(cold), "cached_ms_mean": 1e3 * statistics.mean(cached),
            "cached_ms_max": 1e3 * max(cached)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (default), smollm2-135m-instruct, or a model path")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=16, help="decode steps measured per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile-repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved plain/constrained runs per batch size")
    args = ap.parse_args()
    path = str(resolve_model(args.model).path)
    engine = LLMEngine(NativeEngineConfig(model=path, num_blocks=2048))
    m = engine.model.cfg
    out: dict[str, object] = {"model": args.model, "torch_threads": torch.get_num_threads()}
    step_time(engine, max(int(x) for x in args.batches.split(",")), True, 2, 0, "warm")  # first-use costs, discarded
    for b in (int(x) for x in args.batches.split(",")):
        # Interleaved rounds (plain, constrained, plain, ...): a change in the machine's load lands on both.
        plain, constrained = [], []
        for r in range(args.rounds):
            plain.append(step_time(engine, b, False, args.steps, args.warmup, f"p{b}-{r}"))
            constrained.append(step_time(engine, b, True, args.steps, args.warmup, f"c{b}-{r}"))
        ratios = sorted(c / p for p, c in zip(plain, constrained, strict=True))
        out[f"batch{b}"] = {"plain_ms": round(statistics.median(plain) * 1e3, 3),
                            "json_schema_ms": round(statistics.median(constrained) * 1e3, 3),
                            "overhead_ms": round((statistics.median(constrained) - statistics.median(plain)) * 1e3, 3),
                            "ratio_median": round(statistics.median(ratios), 3),
                            "ratios": [round(x, 3) for x in ratios]}
    out["compile"] = {k: round(v, 3) for k, v in compile_times(Path(path) / "tokenizer.json", m.vocab_size,
                                                                m.eos_token_ids, args.compile_repeats).items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
