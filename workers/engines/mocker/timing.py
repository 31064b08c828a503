"""The mocker's timing model: how long a real engine would take for one scheduled step.

All times here are *modeled* seconds; the engine sleeps `modeled / speedup` of wall time.

    step = sum over prefill chunks of prefill(new, context)
         + (decode_base_ms + decode_us_per_seq * B + decode_us_per_kv_block * K   if B > 0 else 0)

    prefill(new, context) = prefill_us_per_token * new
                          + prefill_us_per_token_pair * (new * context + new * (new + 1) / 2)

where B is the number of sequences decoding one token this step and K the KV blocks they read. A
chunk is a prefill when it schedules more than one token; a one-token entry (a decode, or the last
uncached prompt token) is priced as a decode, as the native engine batches it with the decodes. The
pair term is causal attention: the i-th new token attends to `context + i` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvrelay.workers.core.sequence import Sequence
from kvrelay.workers.engines.mocker.config import MockerConfig


class TimingModel:
    def __init__(self, cfg: MockerConfig):
        self.cfg = cfg

    def prefill_seconds(self, new_tokens: int, context: int = 0) -> float:
        """A prefill chunk of `new_tokens` after `context` tokens whose KV is already computed."""
        pairs = new_tokens * context + new_tokens * (new_tokens + 1) / 2
        c = self.cfg
        return (c.prefill_us_per_token * new_tokens + c.prefill_us_per_token_pair * pairs) * 1e-6

    def decode_seconds(self, batch: int, kv_blocks: int) -> float:
        """One decode step of `batch` sequences holding `kv_blocks` KV blocks between them."""
        if batch == 0:
            return 0.0
        c = self.cfg
        per_step = c.decode_us_per_seq * batch + c.decode_us_per_kv_block * kv_blocks
        return c.decode_base_ms * 1e-3 + per_step * 1e-6

    def step_seconds(self, scheduled: Iterable[tuple[Sequence, int]]) -> float:
        """A scheduled step, priced before it is committed (`num_computed` is the chunk's start)."""
        prefill, batch, kv_blocks = 0.0, 0, 0
        for seq, n in scheduled:
            if n > 1:
                prefill += self.prefill_seconds(n, seq.num_computed)
            else:
                batch += 1
                kv_blocks += len(seq.blocks)
        return prefill + self.decode_seconds(batch, kv_blocks)

    def transfer_seconds(self, num_bytes: int) -> float:
        """Moving `num_bytes` of KV over the simulated link (prefill -> decode handoff)."""
        return num_bytes * 8 / (self.cfg.transfer_gbps * 1e9)

    def wall(self, modeled: float) -> float:
        """Wall-clock seconds to sleep for `modeled` seconds (0 when speedup is 0 or inf)."""
        return modeled / self.cfg.speedup if self.cfg.sleeps else 0.0
