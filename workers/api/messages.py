"""Messages between the frontend and workers (docs/ARCHITECTURE.md "Wire format"): msgspec Structs sent over the
request plane unchanged. The engine interface that produces them is `kvrelay.workers.protocol.Engine`.
"""

from __future__ import annotations

import math

import msgspec

from kvrelay.workers.api.structured import StructuredOutput


class Empty(msgspec.Struct):
    """The request of endpoints that take no arguments (kv_snapshot, stats, model_card)."""


class RequestError(ValueError):
    """A request that is invalid as given; the message is safe to show a client."""


MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs (and on completions' integer logprobs)
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value
MAX_PENALTY = 2.0  # OpenAI's bound on |frequency_penalty| and |presence_penalty|


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """What a request asks of sampling; every field has its effect on the native engine (in vLLM's order:
    logit_bias and min_tokens, then the penalties on the raw logits, then temperature, then min_p, top-k,
    top-p) and is passed to vLLM as its own field (workers/engines/vllm/sampling.py)."""

    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many output tokens
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the top token's; 0 = off
    repetition_penalty: float = 1.0  # over prompt + output tokens: positive logits / p, negative x p
    frequency_penalty: float = 0.0  # over output tokens: logit -= frequency_penalty x count
    presence_penalty: float = 0.0  # over output tokens: logit -= presence_penalty if it occurred
    logit_bias: dict[int, float] = {}  # token id -> added to its raw logit
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: bool = False  # logprob of each chosen token
    top_logprobs: int = 0  # with logprobs: this many most likely tokens per position, with their logprobs
    # The output must match this (structured outputs); the native engine masks each step's logits with
    # the constraint's grammar and ends the request once the grammar is complete (workers/README.md).
    structured: StructuredOutput | None = None

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raises RequestError naming the field; `vocab_size` also bounds the token ids given."""
        if self.max_tokens < 1:
            raise RequestError("max_tokens must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError("min_tokens must be in [0, max_tokens]")
        if self.temperature < 0:
            raise RequestError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise RequestError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise RequestError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:  # NaN fails every comparison, so it is refused too
            raise RequestError("min_p must be in [0, 1]")
        if not (0 < self.repetition_penalty and math.isfinite(self.repetition_penalty)):
            raise RequestError("repetition_penalty must be > 0 and finite")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise RequestError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}]")
        if not all(-MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for b in self.logit_bias.values()):
            raise RequestError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs")
        if not math.isfinite(self.temperature):  # JSON has no inf, but msgpack callers can send one
            raise RequestError("temperature must be finite")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise RequestError("seed must fit in 64 bits")
        if self.structured is not None and (problem := self.structured.problem()) is not None:
            raise RequestError(f"structured: {problem}")
        if vocab_size is not None:
            for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
                if ids and not (min(ids) >= 0 and max(ids) < vocab_size):
                    raise RequestError(f"{name} token ids must be in [0, {vocab_size})")


class KvHandle(msgspec.Struct, frozen=True, kw_only=True):
    """A prefill worker's computed prompt KV, pinned under a lease until the decode worker pulls it
    (docs/ARCHITECTURE.md "Disaggregation"). Block `k` of `block_ids` holds prompt tokens `[k*bs, (k+1)*bs)`;
    the last one may be partial. The decode worker continues from `first_token`."""

    request_id: str
    prefill_instance: str  # the prefill worker's instance id = its transfer engine's peer name
    prefill_address: str  # its request-plane address (for `release`)
    transfer_metadata: bytes  # its `TransferEngine.metadata()`
    pool: str = "g1"
    fingerprint: str  # model fingerprint the blocks were computed with (hash root)
    block_ids: list[int]
    num_tokens: int  # prompt tokens the blocks hold
    first_token: int
    lease_s: float  # the blocks are freed this long after the handle was made, pulled or not
    # A peer's lease (the cluster KV pool): xxh3_64 of each block's bytes when it was pinned
    # (kvbm/block_checksum.py); the puller keeps only blocks whose bytes sum the same. Empty: not verified.
    block_checksums: list[int] = []


class ReleaseRequest(msgspec.Struct, frozen=True):
    """Free a prefill worker's lease early (the decode side is done with it or gave up). Idempotent."""

    request_id: str


class KvPeer(msgspec.Struct, frozen=True, kw_only=True):
    """Another worker that holds the prompt's first `blocks` blocks in G1 (the router's KV index says
    so): the worker given the request may lease and pull them from it instead of computing them."""

    instance_id: str
    address: str  # its request-plane address (`kv_lease`)
    blocks: int


class PeerLeaseRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Pin the leading run of these blocks (block hashes, chained from the prompt's first) that G1 holds,
    under `lease_id`, for a pull; the lease is freed by the pull's notification, `release`, or its expiry."""

    lease_id: str
    fingerprint: str  # a worker of another model answers nothing
    block_hashes: list[int]


class PeerLeaseReply(msgspec.Struct, kw_only=True):
    handle: KvHandle | None = None  # None: none of the blocks is held (or the worker cannot lend)


class EngineRequest(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    cache_salt: str = ""
    lora_name: str = ""
    kv_handle: KvHandle | None = None  # decode after a remote prefill: pull this KV, continue from it
    kv_peer: KvPeer | None = None  # a worker holding a prefix: lease and pull it rather than compute it
    # A migrated request is re-sent as prompt + the output so far: its last this-many prompt tokens are
    # output, which frequency and presence penalties count (min_tokens and max_tokens are reduced instead).
    prior_output_tokens: int = 0


class TopLogprobs(msgspec.Struct, frozen=True, array_like=True):
    """The most likely tokens at one output position, most likely first, with their logprobs (the raw
    distribution, as `EngineOutput.logprobs`)."""

    token_ids: list[int]
    logprobs: list[float]


class EngineOutput(msgspec.Struct, kw_only=True):
    request_id: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None  # one per token when the request asked top_logprobs > 0
    finish_reason: str | None = None  # stop | length | abort
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class PrefillReply(msgspec.Struct, kw_only=True):
    """The `prefill` endpoint's answer: the first token, and the handle to its KV unless that token
    already finished the request (then `handle` is None and nothing is held)."""

    output: EngineOutput
    handle: KvHandle | None = None


class KvLayout(msgspec.Struct, frozen=True, kw_only=True):
    """Describes the engine's G1 pool so KVBM and transfer can move its bytes without knowing the engine."""

    layout: str  # "block_contiguous": [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    device: str

    @property
    def block_bytes(self) -> int:
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[self.dtype]
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize


class TierCounters(msgspec.Struct, kw_only=True):
    """One lower tier of a worker (kvbm/tiers TierStats plus the G1<->tier traffic); cumulative
    counters except the gauges enabled, capacity_bytes, footprint_bytes, used_bytes and blocks."""

    tier: str  # G2 | G3 | G4
    enabled: bool
    capacity_bytes: int
    footprint_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    misses: int
    evictions: int
    rejected_puts: int
    checksum_failures: int
    errors: int
    onboard_blocks: int
    onboard_bytes: int
    onboard_seconds: float
    offload_blocks: int
    offload_bytes: int
    offload_seconds: float


class EngineStats(msgspec.Struct, kw_only=True):
    running: int
    waiting: int
    used_blocks: int
    free_blocks: int
    total_blocks: int
    prefix_hit_tokens: int  # cumulative
    prompt_tokens: int  # cumulative
    generated_tokens: int  # cumulative
    preemptions: int  # cumulative
    held_requests: int = 0  # prefill role: handles whose blocks are pinned until pulled or expired
    remote_prefills: int = 0  # decode role, cumulative: requests that arrived with a KV handle
    pulled_blocks: int = 0  # decode role, cumulative: blocks pulled from prefill workers
    pull_failures: int = 0  # decode role, cumulative: handles recomputed locally instead
    onboarded_blocks: int = 0  # cumulative: blocks loaded from lower tiers instead of recomputed
    reonboarded_blocks: int = 0  # cumulative, of those: blocks of preempted requests loaded back
    offload_pinned: int = 0  # G1 blocks pinned while being copied to lower tiers
    offload_skipped: int = 0  # cumulative: blocks not offloaded because too many were pinned
    peer_asked: int = 0  # cumulative: requests that asked a peer to lend a prefix (the cluster KV pool)
    peer_pulled_blocks: int = 0  # cumulative: blocks pulled from peers instead of computed
    peer_pull_failures: int = 0  # cumulative: peer pulls that did not deliver (recomputed)
    peer_fallbacks: int = 0  # cumulative: peer asks that got less than asked (evicted, gone): recomputed
    peer_followed: int = 0  # cumulative: requests that waited for another's pull of the same run, not asking
    peer_lent_blocks: int = 0  # cumulative: blocks this worker pinned for peers' pulls
    peer_lease_pinned: int = 0  # blocks pinned for peers' pulls now
    peer_lent_from_g2: int = 0  # cumulative, of peer_lent_blocks: blocks loaded from G2 into G1 to lend them
    peer_verify_failures: int = 0  # cumulative: pulled blocks whose checksum did not match (recomputed)
    peer_pulled_bytes: int = 0  # cumulative: bytes pulled from peers that were kept
    peer_pulls_in_flight: int = 0  # pulls (asked or pulling) holding the pull budget now
    peer_budget_refusals: int = 0  # cumulative: asks not made: the pull budget was spent (recomputed)
    peer_pull_seconds_buckets: list[int] = []  # pull latency histogram, per PULL_SECONDS_BUCKETS bound
    peer_pull_seconds_sum: float = 0.0
    prefill_tokens_computed: int = 0  # cumulative: prompt tokens computed (not cached, not loaded)
    prefill_seconds: float = 0.0  # cumulative: wall seconds of the steps that computed prompt tokens
    tiers: list[TierCounters] = []


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    """What a frontend needs to serve a worker's model: tokenizer files and the hashing parameters."""

    name: str
    fingerprint: str
    block_size: int
    max_model_len: int
    files: dict[str, bytes] = {}  # tokenizer.json, tokenizer_config.json, generation_config.json
