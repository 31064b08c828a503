"""Every sampling parameter has its effect on the native engine, token for token as a plain reference:
the model's raw logits from transformers (an independent forward), then each request's logit_bias,
min_tokens and penalties written out one token at a time with vLLM's semantics, then the argmax. The
engine runs all cases in one batch, so rows with different parameters (and none) share each step."""

from __future__ import annotations

import random

import pytest
import torch

from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.engines.native import LLMEngine, NativeEngineConfig
from kvrelay.workers.models import tiny

N = 16
EOS = (1, 3)  # the tiny model's <|end_of_text|> and <|im_end|>


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(4, 2048) for _ in range(rng.randrange(4, 30))] for _ in range(n)]


def raw_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0, -1].float()


def reference_next(logits: torch.Tensor, prompt: list[int], out: list[int], p: SamplingParams) -> int:
    """vLLM's semantics, one token at a time: min_tokens bans stop tokens, logit_bias adds, a token seen
    in prompt or output has a positive logit divided by repetition_penalty (else multiplied), and one
    seen c times in the output loses frequency_penalty * c + presence_penalty."""
    x = logits.clone()
    if len(out) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(EOS)):
            x[t] = float("-inf")
    for t, b in p.logit_bias.items():
        x[t] += b
    for t in set(prompt) | set(out):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(out):
        x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    return int(torch.argmax(x))


def reference(hf, prompt: list[int], p: SamplingParams) -> list[int]:
    out: list[int] = []
    while len(out) < p.max_tokens:
        t = reference_next(raw_logits(hf, prompt + out), prompt, out, p)
        out.append(t)
        if len(out) > p.min_tokens and (t in p.stop_token_ids or (not p.ignore_eos and t in EOS)):
            break
    return out


def run(model_dir, requests: dict[str, tuple[list[int], SamplingParams]], **kw) -> dict[str, list]:
    """Every request in one engine, batched; request id -> its outputs."""
    engine = LLMEngine(NativeEngineConfig(model=str(model_dir), num_blocks=256))
    for rid, (prompt, sp) in requests.items():
        engine.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt, sampling=sp, **kw))
    outs: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
    assert engine.pool.num_free == engine.pool.num_blocks
    return outs


def tokens(outputs: list) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


@pytest.fixture(scope="module")
def looping(model_dir) -> list[list[int]]:
    """Prompts whose greedy 16 tokens repeat a token (few do: the tiny model rarely loops), where output
    penalties must change the answer."""
    candidates = prompts(40, 0)
    got = run(model_dir, {str(i): (p, SamplingParams(max_tokens=N, ignore_eos=True)) for i, p in enumerate(candidates)})
    found = [p for i, p in enumerate(candidates) if len(set(tokens(got[str(i)]))) < N]
    assert len(found) >= 3
    return found[:3]


CASES = {
    "none": SamplingParams(max_tokens=N, ignore_eos=True),
    "repetition": SamplingParams(max_tokens=N, ignore_eos=True, repetition_penalty=1.8),
    "repetition<1": SamplingParams(max_tokens=N, ignore_eos=True, repetition_penalty=0.6),
    "frequency": SamplingParams(max_tokens=N, ignore_eos=True, frequency_penalty=1.5),
    "presence": SamplingParams(max_tokens=N, ignore_eos=True, presence_penalty=2.0),
    "negative": SamplingParams(max_tokens=N, ignore_eos=True, frequency_penalty=-0.7, presence_penalty=-0.4),
    "all": SamplingParams(max_tokens=N, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5,
                          presence_penalty=0.5, logit_bias={7: 3.0, 900: -4.0}),
    "bias": SamplingParams(max_tokens=N, ignore_eos=True, logit_bias={t: 4.0 for t in range(100, 2048, 97)}),
    "min_p": SamplingParams(max_tokens=N, ignore_eos=True, min_p=0.3),  # greedy: min_p cannot change the top
}


def test_every_penalty_and_bias_matches_the_reference_token_for_token(model_dir, hf, looping):
    batch = {f"{name}/{i}": (p, sp) for name, sp in CASES.items()
             for i, p in enumerate(prompts(2, 7) + looping[:1])}
    got = run(model_dir, batch)
    changed = set()
    for rid, (prompt, sp) in batch.items():
        ours = tokens(got[rid])
        assert ours == reference(hf, prompt, sp), rid
        if ours != tokens(got["none/" + rid.split("/")[1]]):
            changed.add(rid.split("/")[0])
    assert changed >= {"repetition", "repetition<1", "frequency", "presence", "negative", "all", "bias"}


def test_penalties_stop_the_repeats_greedy_makes(model_dir, hf, looping):
    strong = {"repetition": SamplingParams(max_tokens=N, ignore_eos=True, repetition_penalty=2.0),
              "frequency": SamplingParams(max_tokens=N, ignore_eos=True, frequency_penalty=2.0),
              "presence": SamplingParams(max_tokens=N, ignore_eos=True, presence_penalty=2.0)}
    batch = {f"{name}/{i}": (p, sp) for name, sp in {**strong, "none": CASES["none"]}.items()
             for i, p in enumerate(looping)}
    got = {rid: tokens(o) for rid, o in run(model_dir, batch).items()}
    for i, prompt in enumerate(looping):
        greedy = got[f"none/{i}"]
        assert len(set(greedy)) < N, "the default output repeats a token"
        for name, sp in strong.items():
            ours = got[f"{name}/{i}"]
            assert ours == reference(hf, prompt, sp), (name, i)
            assert len(set(ours)) > len(set(greedy)), (name, i)


def test_logit_bias_forces_and_bans(model_dir):
    p = prompts(1, 3)[0]
    greedy = tokens(run(model_dir, {"g": (p, CASES["none"])})["g"])
    got = run(model_dir, {"force": (p, SamplingParams(max_tokens=N, ignore_eos=True, logit_bias={1234: 100.0})),
                          "ban": (p, SamplingParams(max_tokens=N, ignore_eos=True,
                                                    logit_bias={t: -100.0 for t in greedy}))})
    assert tokens(got["force"]) == [1234] * N
    assert not set(tokens(got["ban"])) & set(greedy)


def test_min_tokens_holds_back_stop_tokens(model_dir, hf):
    p = prompts(1, 11)[0]
    greedy = tokens(run(model_dir, {"g": (p, CASES["none"])})["g"])
    stop = greedy[2]
    early = SamplingParams(max_tokens=N, stop_token_ids=[stop])
    late = SamplingParams(max_tokens=N, stop_token_ids=[stop], min_tokens=6)
    got = run(model_dir, {"early": (p, early), "late": (p, late)})
    assert tokens(got["early"]) == greedy[:3] and got["early"][-1].finish_reason == "stop"
    ours = tokens(got["late"])
    assert len(ours) > 6 and stop not in ours[:6]
    assert ours == reference(hf, p, late)


def test_top_logprobs_are_the_raw_distributions_top_k(model_dir, hf, looping):
    p = looping[0]
    k = 5
    got = run(model_dir, {"plain": (p, SamplingParams(max_tokens=N, ignore_eos=True, logprobs=True, top_logprobs=k)),
                          "penalized": (p, SamplingParams(max_tokens=N, ignore_eos=True, logprobs=True,
                                                          top_logprobs=k, frequency_penalty=2.0))})
    for rid, outs in got.items():
        toks = tokens(outs)
        lps = [lp for o in outs for lp in o.logprobs]
        tops = [t for o in outs for t in o.top_logprobs]
        assert len(tops) == len(toks) == N
        for i, (tok, lp, top) in enumerate(zip(toks, lps, tops, strict=True)):
            raw = torch.log_softmax(raw_logits(hf, p + toks[:i]), dim=-1)
            ref = torch.topk(raw, k)
            assert top.token_ids == ref.indices.tolist(), (rid, i)
            assert top.logprobs == pytest.approx(ref.values.tolist(), abs=1e-4)
            assert top.logprobs == sorted(top.logprobs, reverse=True)
            assert lp == pytest.approx(float(raw[tok]), abs=1e-4)  # raw, whatever the penalty did
            if rid == "plain":  # greedy: the chosen token is the most likely one
                assert top.token_ids[0] == tok and top.logprobs[0] == pytest.approx(lp, abs=1e-6)
    assert tokens(got["plain"]) != tokens(got["penalized"])


def test_a_migrated_request_keeps_counting_its_earlier_output(model_dir, looping):
    """Re-sent as prompt + output so far with prior_output_tokens (what the frontend's migration does),
    frequency and presence penalties continue exactly as if the request had stayed; without it they
    would forget the earlier output (negative penalties, which favour repeats, show it on this prompt)."""
    p = looping[0]
    penalties = dict(ignore_eos=True, frequency_penalty=-1.0, presence_penalty=-1.0)
    full = tokens(run(model_dir, {"a": (p, SamplingParams(max_tokens=N, **penalties))})["a"])
    forgot = []
    for k in (3, 6):
        rest = (p + full[:k], SamplingParams(max_tokens=N - k, **penalties))
        assert tokens(run(model_dir, {"m": rest}, prior_output_tokens=k)["m"]) == full[k:], k
        forgot.append(tokens(run(model_dir, {"m": rest})["m"]) != full[k:])
    assert any(forgot)
