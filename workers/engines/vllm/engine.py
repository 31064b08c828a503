"""`VllmEngine`: vLLM's `AsyncLLM` in the worker process, as a kvrelay `Engine` (workers/protocol.py).

vLLM keeps its own scheduler and KV manager (a scheduler-owning engine, workers/README.md); what
kvrelay adds around it:
- requests: kvrelay's `EngineRequest` -> vLLM token-id prompts (sampling.py); each request's outputs
  are pumped from vLLM's stream into a queue, so a consumer that leaves never cancels vLLM mid-await;
- KV events: vLLM's ZMQ publisher -> kvrelay `KvEvent`s with kvrelay block hashes (kv_events.py,
  event_subscriber.py), numbered by one `KvEventLog` so `kv_snapshot` agrees with the stream;
- load: vLLM's stat-logger interface (stats.py);
- disaggregation through vLLM's NixlConnector: a prefill returns vLLM's `kv_transfer_params` inside
  kvrelay's handle (`KvHandle.transfer_metadata`, pool "vllm-nixl"); the decode side passes them back
  to vLLM, which reads the blocks itself (`owns_kv_transfer`: the worker runs no transfer engine);
- the cluster KV pool through kvrelay's tier connector (peer_pool.py, `lends_through_connector`): a
  request naming a peer (`EngineRequest.kv_peer`) first leases the prefix from it (`kv_lease`, as the
  native core's peer source does), then goes to vLLM with the handle in `kv_transfer_params`, where the
  connector pulls the blocks like a tier load; `lease_blocks` lends what this worker's tiers hold
  (peer_lend.py). The lease is given back when vLLM's first token shows the pull is over (its
  notification usually freed it already); a request aborted before that leaves it to expire.

Invariants: every request ends with exactly one final output or one exception; a request whose consumer
leaves early is aborted in vLLM (its blocks freed), except that the abort of a decode whose KV is being
read is deferred until vLLM produced its first token (aborting during the NIXL read is what crashed
EngineCore in the field; the read has finished once a token exists).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.kvbm.fingerprint import model_fingerprint
from kvrelay.runtime.free_port import free_port
from kvrelay.workers.api.errors import EngineError, EngineOverloaded
from kvrelay.workers.api.messages import EngineOutput, EngineRequest, EngineStats, KvLayout, RequestError
from kvrelay.workers.api.prefill import KvPuller, PrefillResult
from kvrelay.workers.core.kv_events import KvEventLog
from kvrelay.workers.engines.vllm.config import VllmEngineConfig, engine_args
from kvrelay.workers.engines.vllm.event_subscriber import VllmEventSubscriber
from kvrelay.workers.engines.vllm.kv_events import VllmEventMapper, decode_batch
from kvrelay.workers.engines.vllm.orphan_guard import disarm, guard_process_group
from kvrelay.workers.engines.vllm.peer_ask import PeerAsker
from kvrelay.workers.engines.vllm.sampling import to_output, to_vllm
from kvrelay.workers.engines.vllm.start_errors import EngineStartError, StartErrorLog, model_shape
from kvrelay.workers.engines.vllm.stats import VllmStats, stat_logger_factory

log = logging.getLogger(__name__)

HANDLE_POOL = "vllm-nixl"
_PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                   "remote_block_ids": None, "remote_host": None, "remote_port": None}
_END = object()


class VllmEngine:
    owns_kv_transfer = True  # vLLM's connector moves KV between workers; no kvrelay transfer engine
    fingerprint: str
    max_model_len: int

    def __init__(self, cfg: VllmEngineConfig, max_waiting: int = 1024, token: str = ""):
        self.cfg, self.max_waiting = cfg, max_waiting
        self.lends_through_connector = cfg.pool is not None and cfg.tiers is not None
        self.peers = PeerAsker(token) if self.lends_through_connector else None
        self.llm: Any = None
        self.stats_sink = VllmStats()
        self.events = KvEventLog()
        self.mapper: VllmEventMapper | None = None
        self.subscriber: VllmEventSubscriber | None = None
        self._sink: Callable[[list[KvEvent]], None] | None = None
        self._in_flight = 0
        self._deferred: set[asyncio.Task] = set()
        self._watchdog: Any = None  # orphan_guard: kills vLLM's processes if this one dies uncleanly

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        # Never a native engine's fingerprint: vLLM's KV layout differs, so handles must not cross.
        self.fingerprint = "vllm-" + model_fingerprint(self.cfg.model)
        cfg = self.cfg = dataclasses.replace(self.cfg, fingerprint=self.fingerprint)
        if cfg.role != "agg":  # vLLM's NIXL side channel: where kvrelay's worker listens, on a free port
            os.environ.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", cfg.host)
            os.environ.setdefault("VLLM_NIXL_SIDE_CHANNEL_PORT", str(free_port(cfg.host)))
        layers, kv_heads, head_dim, itemsize = model_shape(cfg.model, cfg.dtype)
        if self.peers is not None:
            self.peers.before_vllm_starts()  # the token reaches vLLM's worker process in its environment
        if cfg.guard_orphans:
            self._watchdog = guard_process_group()
        errors = StartErrorLog(Path(cfg.socket_dir))
        try:
            from vllm.v1.engine.async_llm import AsyncLLM

            args = engine_args(cfg, layers * 2 * kv_heads * head_dim * itemsize)
            self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_factory(self.stats_sink)])
        except Exception as e:
            disarm(self._watchdog)  # vLLM's half-started processes go with it
            self._watchdog = None
            raise EngineStartError(errors.reason(e)) from None
        vc = self.llm.vllm_config
        self.block_size = vc.cache_config.block_size
        self.num_blocks = int(vc.cache_config.num_gpu_blocks or 0)
        self.max_model_len = vc.model_config.max_model_len
        self.dtype = str(vc.model_config.dtype).removeprefix("torch.")
        self.shape = (layers, kv_heads, head_dim)
        self.mapper = VllmEventMapper(self.fingerprint, self.block_size, self.events)
        pub, replay = cfg.event_endpoints()
        self.subscriber = VllmEventSubscriber(pub, replay, self._on_batch, self._on_lost)
        self.subscriber.start()
        if self.peers is not None:
            self.peers.start(cfg.socket_dir, self.fingerprint, self.block_size)
        log.info("vLLM engine up: %d KV blocks of %d tokens, max_model_len %d, role %s", self.num_blocks,
                 self.block_size, self.max_model_len, cfg.role)

    async def close(self) -> None:
        for t in list(self._deferred):
            t.cancel()
        if self.subscriber is not None:
            await self.subscriber.close()
            self.subscriber = None
        if self.peers is not None:
            await self.peers.close()
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        disarm(self._watchdog)  # after vLLM's own shutdown: only stragglers are left to kill
        self._watchdog = None
        shutil.rmtree(self.cfg.socket_dir, ignore_errors=True)

    # -- requests ----------------------------------------------------------------------------------------
    def _admit(self, request: EngineRequest) -> None:
        if self.llm is None:
            raise EngineError("engine is not running")
        try:
            request.sampling.validate()  # the same refusals as the core's (vLLM checks ids against its vocab)
        except RequestError as e:
            raise EngineError(str(e)) from None
        if self._in_flight >= self.cfg.limits.max_num_seqs + self.max_waiting:
            raise EngineOverloaded(f"{self._in_flight} requests in flight; try again later")
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise EngineError(f"prompt of {len(request.prompt_token_ids)} tokens does not fit the context "
                              f"length of {self.max_model_len} tokens")

    def _prompt(self, request: EngineRequest, extra: Sequence[int] = ()) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_token_ids) + list(extra)}
        if request.cache_salt:
            prompt["cache_salt"] = request.cache_salt
        return prompt

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self._admit(request)
        handle = request.kv_handle
        params = None
        if handle is not None:
            params = self._usable_handle(request)
            self.stats_sink.remote_prefills += 1
            self.stats_sink.pull_failures += params is None
        n = len(request.prompt_token_ids)
        if handle is not None and request.sampling.max_tokens == 1:  # the handle's token was the whole answer
            yield EngineOutput(request_id=request.request_id, token_ids=[], finish_reason="length",
                               num_prompt_tokens=n)
            return
        if params is None and handle is not None:  # recompute locally from the handle's first token
            async for out in self._stream(request, self._prompt(request, [handle.first_token]),
                                          to_vllm(request.sampling, already=1),
                                          n + 1, deferred=False):
                yield msgspec.structs.replace(out, num_prompt_tokens=n)
            return
        lease = None
        if handle is None and request.kv_peer is not None and self.peers is not None:
            lease = await self.peers.ask(request)
            params = lease.params if lease is not None else None
        sampling = to_vllm(request.sampling, kv_transfer_params=params)
        first = handle is not None
        mismatch = False
        stream = self._stream(request, self._prompt(request), sampling, n, deferred=handle is not None)
        try:
            async for out in stream:
                if lease is not None and (out.token_ids or out.finish_reason is not None):
                    assert self.peers is not None  # a lease comes from it
                    self.peers.give_back(lease)  # vLLM scheduled the request: its pull is over
                    lease = None
                if first and out.token_ids:  # vLLM decodes from the prompt and samples the first token again
                    first = False
                    assert handle is not None
                    if out.token_ids[0] != handle.first_token:  # sampled differently: continue from ours
                        self.stats_sink.pull_failures += 1
                        log.info("request %s: decode sampled %d, prefill %d; recomputing from the prefill's "
                                 "token", request.request_id, out.token_ids[0], handle.first_token)
                        mismatch = True
                        break
                    out = msgspec.structs.replace(
                        out, token_ids=out.token_ids[1:], logprobs=out.logprobs[1:] if out.logprobs else out.logprobs,
                        top_logprobs=out.top_logprobs[1:] if out.top_logprobs else out.top_logprobs)
                yield out
        finally:
            # Closed before any recompute starts, so the request counts once in `_in_flight`.
            await stream.aclose()
        if mismatch:
            assert handle is not None and self.llm is not None
            await self.llm.abort(request.request_id)  # the cancelled pump aborts too; this does it now
            async for rest in self._stream(request, self._prompt(request, [handle.first_token]),
                                           to_vllm(request.sampling, already=1),
                                           n + 1, deferred=False, rid_suffix="-r"):
                yield msgspec.structs.replace(rest, num_prompt_tokens=n)

    def _usable_handle(self, request: EngineRequest) -> dict | None:
        """vLLM's kv_transfer_params from the handle, or None (recompute) if it is not for this engine."""
        h = request.kv_handle
        assert h is not None
        if (h.pool != HANDLE_POOL or h.fingerprint != self.fingerprint or h.num_tokens != len(request.prompt_token_ids)
                or self.cfg.role == "agg"):
            return None
        try:
            params = msgspec.msgpack.decode(h.transfer_metadata)
        except msgspec.DecodeError:
            return None
        return params if isinstance(params, dict) and params.get("do_remote_prefill") else None

    async def _stream(self, request: EngineRequest, prompt: dict, sampling: Any, n: int, *, deferred: bool,
                      rid_suffix: str = "") -> AsyncGenerator[EngineOutput, None]:
        """vLLM's outputs for one request, through a pump task (see the module's invariants)."""
        rid = request.request_id + rid_suffix
        queue: asyncio.Queue[Any] = asyncio.Queue()
        seen_first = asyncio.Event()
        self._in_flight += 1

        async def pump() -> None:
            try:
                async for out in self.llm.generate(prompt, sampling, request_id=rid):
                    if out.outputs[0].token_ids or out.finished:
                        seen_first.set()
                    queue.put_nowait(out)
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait(e)
            finally:
                seen_first.set()
                queue.put_nowait(_END)

        task = asyncio.create_task(pump(), name=f"vllm-{rid}")
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    raise EngineError("vLLM ended the request without a final output")
                if isinstance(item, Exception):
                    finished = True
                    raise _engine_error(item)
                out = to_output(request.request_id, item, n, request.sampling.top_logprobs)
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._in_flight -= 1
            if not finished:
                if deferred and not seen_first.is_set():
                    self._defer_abort(task, seen_first, rid)
                else:
                    task.cancel()  # vLLM's generator aborts the request when cancelled

    def _defer_abort(self, task: asyncio.Task, seen_first: asyncio.Event, rid: str) -> None:
        async def later() -> None:
            try:
                await asyncio.wait_for(seen_first.wait(), self.cfg.kv_lease_s + 30)
            except asyncio.TimeoutError:
                log.warning("request %s: no first token %.0f s after its consumer left; aborting", rid,
                            self.cfg.kv_lease_s + 30)
            task.cancel()

        t = asyncio.create_task(later())
        self._deferred.add(t)
        t.add_done_callback(self._deferred.discard)

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        """The first token, with vLLM holding the prompt's blocks for the decode side (its lease)."""
        self._admit(request)
        # A request that ends with its first token needs no handle: vLLM would hold its blocks for the
        # decode side until its lease ran out.
        hold = request.sampling.max_tokens > 1
        sampling = to_vllm(request.sampling, max_tokens=1, kv_transfer_params=dict(_PREFILL_PARAMS) if hold else None)
        n = len(request.prompt_token_ids)
        final: Any = None
        async for out in self._raw(request, sampling):
            final = out
        first = to_output(request.request_id, final, n, request.sampling.top_logprobs)
        params = final.kv_transfer_params
        vllm_reason = first.finish_reason
        reason = "stop" if vllm_reason == "stop" else ("length" if request.sampling.max_tokens == 1 else None)
        first = msgspec.structs.replace(first, finish_reason=reason)
        if reason is not None or not params or not params.get("remote_block_ids"):
            return PrefillResult(first, [])
        block_ids = params["remote_block_ids"]
        flat = block_ids[0] if block_ids and isinstance(block_ids[0], list) else block_ids
        return PrefillResult(first, list(flat), transfer_params=msgspec.msgpack.encode(params), pool=HANDLE_POOL)

    async def _raw(self, request: EngineRequest, sampling: Any) -> AsyncIterator[Any]:
        """vLLM's RequestOutputs for a prefill (cancelling the caller aborts it in vLLM)."""
        self._in_flight += 1
        try:
            async for out in self.llm.generate(self._prompt(request), sampling, request_id=request.request_id):
                yield out
        except (EngineError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise _engine_error(e) from None
        finally:
            self._in_flight -= 1

    async def abort(self, request_id: str) -> None:
        if self.peers is not None and request_id.startswith("peer:"):  # a lease lent to a peer (worker's timer)
            await self.peers.free(request_id)
        if self.llm is not None:
            await self.llm.abort(request_id)

    # -- KV events, layout, stats ----------------------------------------------------------------------
    def _on_batch(self, payload: bytes) -> None:
        assert self.mapper is not None
        self.mapper.apply(decode_batch(payload))
        self._flush()

    def _on_lost(self) -> None:
        assert self.mapper is not None
        self.mapper.clear()
        self._flush()

    def _flush(self) -> None:
        events = self.events.drain()
        if events and self._sink is not None:
            self._sink(events)

    def subscribe_kv_events(self, sink: Callable[[list[KvEvent]], None]) -> None:
        self._sink = sink

    async def kv_snapshot(self) -> KvSnapshot:
        assert self.mapper is not None, "start() first"
        self._flush()  # everything numbered so far has reached the sink
        return self.events.snapshot(self.mapper.snapshot_hashes())

    def kv_layout(self) -> KvLayout:
        layers, kv_heads, head_dim = self.shape
        return KvLayout(layout="vllm", num_blocks=self.num_blocks, num_layers=layers, block_size=self.block_size,
                        num_kv_heads=kv_heads, head_dim=head_dim, dtype=self.dtype, device=self.cfg.device)

    def stats(self) -> EngineStats:
        stats = self.stats_sink.engine_stats(self.num_blocks, self._in_flight, self.block_size)
        return self.peers.add_counters(stats) if self.peers is not None else stats

    def set_kv_puller(self, puller: KvPuller) -> None:
        raise EngineError("the vLLM engine moves KV through vLLM's NixlConnector, not a kvrelay puller")

    def set_peer_puller(self, puller: KvPuller, peers: Any) -> None:
        pass  # not called: the worker runs no transfer engine for an engine that owns its KV transfer

    async def lease_blocks(self, lease_id: str, hashes: list[int]) -> list[int]:
        """The staging rows holding the leading run of `hashes` this worker's tiers hold (peer_pool.py)."""
        return await self.peers.lend(lease_id, hashes) if self.peers is not None else []

    def transfer_stats(self) -> Any:
        """The pool's transfer engine in vLLM's worker process (its stats ride vLLM's connector stats)."""
        from kvrelay.transfer.base import TransferStats

        snap = self.stats_sink.peer_transfer
        return msgspec.convert(snap, TransferStats) if snap else None

    def lend_pool(self) -> tuple[str, bytes] | None:
        return self.peers.lend_pool if self.peers is not None else None

    async def block_checksums(self, block_ids: list[int]) -> list[int]:
        return []  # never lends (lease_blocks)

    def kv_pool(self) -> None:
        return None


def _engine_error(e: Exception) -> Exception:
    """vLLM's refusal of a request (ValueError: too long, token out of vocabulary) as a client error."""
    if isinstance(e, (EngineError, asyncio.CancelledError)):
        return e
    if isinstance(e, (ValueError, TypeError)) or any(c.__name__ == "VLLMClientError" for c in type(e).__mro__):
        return EngineError(str(e).splitlines()[0] if str(e) else type(e).__name__)
    log.error("vLLM failed a request", exc_info=e)
    return RuntimeError(f"vLLM engine error: {type(e).__name__}")
