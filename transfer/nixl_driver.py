"""The one thread that owns a `nixl_agent`: every agent call, every post, every poll and all UCX progress.

Measured with nixl-cu12 1.5.1 / UCX 1.23 on this 2-core CPU machine (README.md has the numbers):
- UCX picks `am(tcp/lo cma/memory)` between two local processes and `transfer()` (postXferReq) does
  the whole CMA copy inside the call (GIL released): ~85 ms for 64 MiB under load. Posted from a
  coroutine, that would freeze the worker's event loop; on RDMA/GPU the post returns at once and
  completion has to be polled. One driver thread serves both: it posts, polls every in-flight handle,
  and resolves a `concurrent.futures.Future` per transfer that the engine awaits.
- NIXL's own progress thread (`enable_prog_thread=True`, the default) polls UCX with zero delay: an
  idle agent burns a whole core (0.99 CPU s/s). On 2 cores that made a 32 MiB read 8x slower
  (0.64 vs 5.0 GB/s). So the engine turns it off by default and this thread makes progress instead:
  back-to-back while transfers are in flight, and every `PROGRESS_S` (1 ms) when idle, which is also
  when notifications are collected. An idle agent then costs a few % of a core. The 1 ms matters
  only where the target must take part (UCX over plain TCP between hosts: active messages), where it
  adds up to 1 ms per protocol round trip; pass `progress_thread=True` on machines with cores to spare.
- Polling while in flight: `SPIN_POLLS` back-to-back checks (catch small transfers with no added
  latency), then sleeps from `MIN_SLEEP_S` doubling to `MAX_SLEEP_S`: completion is seen at most
  200 µs late (<1% of a 32 MiB handoff) at ~5k wakeups/s, not a spinning core.
The agent is created with thread sync NONE and touched only from this thread.

Every handle is released exactly once, on success, error, timeout, abort or close (LMCache #1339).
A handle NIXL refuses to release (a transfer it cannot cancel) is retried each round and counted in
`active_handles` until it goes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kvrelay.transfer.base import TransferError

log = logging.getLogger(__name__)
T = TypeVar("T")

SPIN_POLLS = 32
MIN_SLEEP_S = 20e-6
MAX_SLEEP_S = 200e-6
PROGRESS_S = 1e-3


class Xfer:
    """One transfer: `make(agent)` builds the handle on the driver thread; `future` resolves when done."""

    __slots__ = ("make", "deadline", "what", "future", "handle", "abort")

    def __init__(self, make: Callable[[Any], Any], deadline: float, what: str):
        self.make, self.deadline, self.what = make, deadline, what
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.handle: Any = None
        self.abort = False  # set from the loop thread when the awaiting coroutine is cancelled


class _Call:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


_STOP = object()


class NixlDriver:
    def __init__(self, make_agent: Callable[[], Any], on_notifs: Callable[[dict[str, list[bytes]]], None],
                 name: str = "nixl"):
        self._on_notifs = on_notifs
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inflight: list[Xfer] = []
        self._stuck: list[Any] = []  # handles whose release failed; retried every round
        self._stopped = False
        self._cleanup: Callable[[Any], None] | None = None
        ready: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(make_agent, ready),
                                        name=f"nixl-driver-{name}", daemon=True)
        self._thread.start()
        self.agent = ready.result()  # re-raises the agent's creation error in the constructor's caller

    @property
    def active_handles(self) -> int:
        return len(self._inflight) + len(self._stuck)

    # -- called from other threads --------------------------------------------------------------------
    def call(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(agent)` on the driver thread and return its result (blocking the caller)."""
        if threading.current_thread() is self._thread:
            return fn(self.agent)
        return self.submit_call(fn).result()

    def submit_call(self, fn: Callable[[Any], T]) -> concurrent.futures.Future[T]:
        """Queue `fn(agent)` for the driver thread; await it with `asyncio.wrap_future`."""
        if self._stopped:
            raise TransferError("NIXL engine is closed")
        op = _Call(fn)
        self._q.put(op)
        return op.future

    def submit(self, xfer: Xfer) -> concurrent.futures.Future[None]:
        if self._stopped:
            raise TransferError("NIXL engine is closed")
        self._q.put(xfer)
        return xfer.future

    def stop(self, cleanup: Callable[[Any], None] | None = None, timeout: float = 10.0) -> None:
        """Fail and release in-flight transfers, run `cleanup(agent)` (deregistration), drop the agent."""
        if not self._stopped:
            self._stopped = True
            self._cleanup = cleanup
            self._q.put(_STOP)
        self._thread.join(timeout)

    # -- the driver thread ----------------------------------------------------------------------------
    def _main(self, make_agent: Callable[[], Any], ready: concurrent.futures.Future[Any]) -> None:
        try:
            self.agent = make_agent()
        except BaseException as e:  # noqa: BLE001 - handed to the constructor's caller
            ready.set_exception(e)
            return
        ready.set_result(self.agent)
        idle_rounds, next_notif = 0, 0.0
        while True:
            op = self._next_op(idle_rounds)
            if op is _STOP:
                break
            if op is not None:
                self._run(op)
                idle_rounds = 0
                continue
            progressed = self._poll_inflight() if self._inflight else False
            if self._stuck:
                self._retry_stuck()
            now = time.monotonic()
            if now >= next_notif:
                self._poll_notifs()
                next_notif = now + PROGRESS_S
            idle_rounds = 0 if progressed else idle_rounds + 1
        self._shutdown()

    def _next_op(self, idle_rounds: int) -> Any:
        if self._inflight or self._stuck:
            if idle_rounds < SPIN_POLLS:
                wait = 0.0
            else:
                wait = min(MIN_SLEEP_S * 2 ** min(idle_rounds - SPIN_POLLS, 16), MAX_SLEEP_S)
        else:
            wait = PROGRESS_S
        try:
            return self._q.get(timeout=wait) if wait > 0 else self._q.get_nowait()
        except queue.Empty:
            return None

    def _run(self, op: Any) -> None:
        if isinstance(op, _Call):
            try:
                op.future.set_result(op.fn(self.agent))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                op.future.set_exception(e)
            return
        x: Xfer = op
        if x.abort:
            x.future.set_exception(TransferError(f"{x.what}: cancelled before it was posted"))
            return
        try:
            x.handle = x.make(self.agent)
            state = self.agent.transfer(x.handle)
        except Exception as e:
            self._finish(x, TransferError(f"{x.what} failed to post: {type(e).__name__}: {e}"))
            return
        if state == "DONE":
            self._finish(x, None)
        elif state == "ERR":
            self._finish(x, TransferError(f"{x.what} failed (NIXL status ERR on post)"))
        else:
            self._inflight.append(x)

    def _poll_inflight(self) -> bool:
        progressed = False
        now = time.monotonic()
        for x in list(self._inflight):
            try:
                state = self.agent.check_xfer_state(x.handle)
            except Exception as e:
                state, err = "ERR", f"{type(e).__name__}: {e}"
            else:
                err = "NIXL status ERR"
            if state == "PROC":
                if x.abort:
                    err, state = "cancelled", "ERR"
                elif now > x.deadline:
                    err, state = "timed out", "ERR"
                else:
                    continue
            self._inflight.remove(x)
            progressed = True
            self._finish(x, None if state == "DONE" else TransferError(f"{x.what} {err}"))
        return progressed

    def _finish(self, x: Xfer, error: Exception | None) -> None:
        if x.handle is not None:
            if not self._release(x.handle) and error is not None:
                error = TransferError(f"{error}; NIXL could not cancel it, so the destination blocks may "
                                      "still change: do not reuse them")
            x.handle = None
        if error is None:
            x.future.set_result(None)
        else:
            x.future.set_exception(error)

    def _release(self, handle: Any) -> bool:
        try:
            self.agent.release_xfer_handle(handle)
            return True
        except Exception as e:  # an active transfer NIXL cannot cancel: keep it, retry later
            log.warning("NIXL could not release transfer handle %r yet: %s", handle, e)
            self._stuck.append(handle)
            return False

    def _retry_stuck(self) -> None:
        for h in list(self._stuck):
            try:
                self.agent.release_xfer_handle(h)
                self._stuck.remove(h)
            except Exception:
                pass

    def _poll_notifs(self) -> None:
        try:
            notifs = self.agent.get_new_notifs()
        except Exception:
            log.warning("polling NIXL notifications failed", exc_info=True)
            return
        if notifs:
            self._on_notifs(notifs)

    def _shutdown(self) -> None:
        for x in self._inflight:
            self._finish(x, TransferError(f"{x.what}: engine closed"))
        self._inflight.clear()
        while True:  # fail whatever was queued behind _STOP
            try:
                op = self._q.get_nowait()
            except queue.Empty:
                break
            if op is not _STOP:
                op.future.set_exception(TransferError("NIXL engine is closed"))
        self._retry_stuck()
        if self._cleanup is not None:
            try:
                self._cleanup(self.agent)
            except Exception:
                log.warning("NIXL cleanup at close failed", exc_info=True)
        self.agent = None  # the last reference: nixl_agent's destructor stops its progress thread
