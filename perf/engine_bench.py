"""Native engine vs transformers, side by side in one process on the same machine (issue #3).

    python -m kvrelay.perf.engine_bench [--models tiny,100m,smollm2] [--repeats 3] [--device cpu|cuda] [--json out.json]

For each model: prefill tokens/s (512 and 2,048-token prompts), decode tokens/s at batch 1 and 16,
and TTFT of a 2,048-token prompt cold vs with its prefix cached. transformers runs `generate` greedy
with its default (dynamic) cache. Decode rate on both sides = B*N / (t(N+1 new tokens) - t(1 new token)),
so prefill cost cancels out. Each measurement is the median of `--repeats`, interleaved ours/theirs;
`best_ratio` compares the fastest repeat of each side (noise on a shared machine only adds time).
`decode_b16_floor_ms` is the time of one b16 step's GEMMs alone (the model's own weights, 16 rows):
no fp32 engine's step can be shorter on this machine, so transformers' step / floor bounds the ratio
any engine could reach. `decode_b1_floor_ms` is the physical floor of a batch-1 step: a step must
stream every weight once, so it cannot beat one torch `copy_` of the model's weight bytes, timed here
in the same run (`ours_step / copy` is how close the engine gets); `gemvs` is every Linear applied to
one row, the floor that fp32 BLAS matrix-vector products actually reach on the machine.

Models: `tiny` (built-in), `100m` (random Llama built here), `smollm2` (SmolLM2-135M-Instruct from the
packaged GGUF, converted into the cache; both engines load the converted checkpoint).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.native import LLMEngine, NativeEngineConfig

MODELS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "100m": (768, 10, 12, 4, 2048, 16000),
}


def build_100m(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = MODELS["100m"]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=4096, initializer_range=0.05)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Ours:
    def __init__(self, path: str, device: str = "cpu"):
        self.engine = LLMEngine(NativeEngineConfig(model=path, limits=EngineLimits(max_num_batched_tokens=4096),
                                                   kv_cache_bytes=1 << 30, device=device))
        self.n = 0

    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        t = time.perf_counter()
        for p in prompts:
            self.n += 1
            self.engine.add_request(EngineRequest(request_id=str(self.n), prompt_token_ids=p,
                                                  sampling=SamplingParams(max_tokens=new_tokens, ignore_eos=True)))
        while self.engine.has_work():
            self.engine.step()
        return time.perf_counter() - t

    def clear_cache(self) -> None:
        self.engine.pool.reset_prefix_cache()


class Theirs:
    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.device = device
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        # transformers' `to` is @wraps(nn.Module.to): mypy sees the unbound signature
        self.model = model.to(device).eval()  # type: ignore[arg-type]  # see above

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        ids = torch.tensor(prompts, device=self.device)
        sync(self.device)
        t = time.perf_counter()
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        sync(self.device)
        return time.perf_counter() - t

    def clear_cache(self) -> None:
        pass


def median_of(repeats: int, fn) -> float:
    return statistics.median(fn() for _ in range(repeats))


@torch.inference_mode()
def copy_floor_ms(model: torch.nn.Module, repeats: int = 7) -> tuple[float, int]:
    """(fastest `copy_` of as many bytes as the model's weights (tied ones once), those bytes)."""
    params = {p.data_ptr(): p for p in model.parameters()}.values()
    nbytes = sum(p.numel() * p.element_size() for p in params)
    dev = str(next(iter(params)).device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)

    def once() -> float:
        sync(dev)
        t = time.perf_counter()
        dst.copy_(src)
        sync(dev)
        return (time.perf_counter() - t) * 1e3

    once()
    return min(once() for _ in range(repeats)), nbytes


@torch.inference_mode()
def gemm_floor_ms(model: torch.nn.Module, rows: int = 16, repeats: int = 7) -> float:
    """Fastest of `repeats` timings of every Linear of `model` applied once to `rows` rows."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dev = str(linears[0].weight.device)
    xs = {m.in_features: torch.randn(rows, m.in_features, dtype=m.weight.dtype, device=dev) for m in linears}

    def once() -> float:
        sync(dev)
        t = time.perf_counter()
        for m in linears:
            m(xs[m.in_features])
        sync(dev)
        return (time.perf_counter() - t) * 1e3

    once()
    return min(once() for _ in range(repeats))


def bench_model(path: str, vocab: int, repeats: int, device: str = "cpu") -> dict:
    ours, theirs = Ours(path, device), Theirs(path, device)
    gen = torch.Generator().manual_seed(0)

    def prompts(b: int, n: int) -> list[list[int]]:
        return torch.randint(3, vocab, (b, n), generator=gen).tolist()

    res: dict[str, dict[str, float]] = {}
    for side in (ours, theirs):  # warm-up
        side.run(prompts(2, 64), 4)
    for n in (512, 2048):
        def prefill(side, n=n):
            side.clear_cache()
            return n / side.run(prompts(1, n), 1)
        res[f"prefill_{n}_tok_s"] = {"ours": median_of(repeats, lambda: prefill(ours)),
                                     "transformers": median_of(repeats, lambda: prefill(theirs))}
    for b in (1, 16):
        def decode(side, b=b, new=64):
            batch = prompts(b, 128)
            side.clear_cache()
            t1 = side.run(batch, 1)
            side.clear_cache()
            return b * new / (side.run(batch, new + 1) - t1)
        runs: dict[str, list[float]] = {"ours": [], "transformers": []}
        for _ in range(repeats):
            runs["ours"].append(decode(ours))
            runs["transformers"].append(decode(theirs))
        res[f"decode_b{b}_tok_s"] = {k: statistics.median(v) for k, v in runs.items()}
        res[f"decode_b{b}_tok_s"]["best_ratio"] = max(runs["ours"]) / max(runs["transformers"])
    floor = gemm_floor_ms(theirs.model)
    theirs_step = 16 / res["decode_b16_tok_s"]["transformers"] * 1e3
    res["decode_b16_floor_ms"] = {"gemms": floor, "transformers_step": theirs_step, "ceiling": theirs_step / floor}
    copy_ms, nbytes = copy_floor_ms(theirs.model)
    ours_b1 = 1e3 / res["decode_b1_tok_s"]["ours"]
    res["decode_b1_floor_ms"] = {"weight_mb": nbytes / 1e6, "copy": copy_ms, "gemvs": gemm_floor_ms(theirs.model, 1),
                                 "ours_step": ours_b1,
                                 "transformers_step": 1e3 / res["decode_b1_tok_s"]["transformers"],
                                 "ours_over_floor": ours_b1 / copy_ms}
    cold, warm = [], []
    for _ in range(repeats):
        p = prompts(1, 2048)
        ours.clear_cache()
        cold.append(ours.run(p, 1))
        warm.append(ours.run(p, 1))
    res["ttft_2048_s"] = {"cold": statistics.median(cold), "prefix_cached": statistics.median(warm)}
    for v in res.values():
        if "ours" in v:
            v["ratio"] = v["ours"] / v["transformers"]
    res["ttft_2048_s"]["speedup"] = res["ttft_2048_s"]["cold"] / res["ttft_2048_s"]["prefix_cached"]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrelay.perf.engine_bench")
    p.add_argument("--models", default="tiny,100m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both engines, fp32)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name in ("tiny", "smollm2"):
                from kvrelay.workers.models.registry import SMOLLM2, TINY, resolve_model

                path = resolve_model(TINY if name == "tiny" else SMOLLM2).path
            else:
                path = build_100m(Path(tmp) / name)
            vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
            out[name] = bench_model(str(path), vocab, args.repeats, args.device)
            print(f"\n## {name}")
            for k, v in out[name].items():
                print(f"| {k} | " + " | ".join(f"{kk} {vv:,.3f}" for kk, vv in v.items()) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
