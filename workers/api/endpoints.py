"""The worker's request-plane names, one place (docs/ARCHITECTURE.md "Request plane").

Endpoint names are what `RpcServer.add_endpoint` registers and `WorkerClient` calls; error kinds are
the `RemoteError.kind` a caller sees when an engine refuses a request (the refusing exception's class
name on the worker, see runtime/rpc/server.py). `tests/workers/test_api_contract.py` checks that each
kind names the class that raises it, so a rename cannot silently turn a 503 into a 400.
"""

from __future__ import annotations

from kvrelay.runtime.str_enum import StrEnum


class Endpoint(StrEnum):
    GENERATE = "generate"  # EngineRequest -> stream of EngineOutput
    PREFILL = "prefill"  # prefill role: EngineRequest -> one PrefillReply
    RELEASE = "release"  # prefill role, and peers: ReleaseRequest -> Empty
    KV_LEASE = "kv_lease"  # peers: PeerLeaseRequest -> PeerLeaseReply (blocks pinned for a pull)
    KV_SNAPSHOT = "kv_snapshot"  # Empty -> KvSnapshot
    STATS = "stats"  # Empty -> EngineStats
    MODEL_CARD = "model_card"  # Empty -> ModelCard
    TRANSFER_STATS = "transfer_stats"  # Empty -> TransferStats


class ErrorKind(StrEnum):
    ENGINE_OVERLOADED = "EngineOverloaded"  # the waiting queue is full: retry elsewhere or later (503)
    ENGINE_ERROR = "EngineError"  # the request is invalid for this engine (400)


class Role(StrEnum):
    AGG = "agg"  # prefills and decodes its own requests
    PREFILL = "prefill"  # computes prompts and hands their KV to decode workers
    DECODE = "decode"  # decodes; pulls a prefill worker's KV or prefills locally
