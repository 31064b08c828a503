"""A transfer-engine peer in its own process, for the two-process tests.

    python peer_child.py nixl|tcp NAME

Registers a KV pool (`kv_pool(REMOTE_BLOCKS, seed=1)`: random bytes, in the layout contract's shape),
prints `META <base64 metadata>`, then serves. For every notification it receives it prints
`NOTIF <sender> <message> <sha256 of its whole pool>`, so the parent can check what a write did.
Exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
import threading

import torch

# [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] fp16: 4*2*16*2*256*2 B = 128 KiB a block.
BLOCK_SHAPE = (4, 2, 16, 2, 256)
BLOCK_BYTES = 4 * 2 * 16 * 2 * 256 * 2
REMOTE_BLOCKS = 48  # 6 MiB: a whole-pool read spans two TCP chunks


def kv_pool(num_blocks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (num_blocks * BLOCK_BYTES,), dtype=torch.uint8, generator=g)
    return raw.view(torch.float16).view(num_blocks, *BLOCK_SHAPE)


def digest(pool: torch.Tensor) -> str:
    return hashlib.sha256(pool.reshape(-1).view(torch.uint8).numpy()).hexdigest()


async def main(kind: str, name: str) -> None:
    from kvrelay.transfer import NixlTransferEngine, TcpTransferEngine

    engine = NixlTransferEngine(name) if kind == "nixl" else TcpTransferEngine(name)
    kv = kv_pool(REMOTE_BLOCKS, seed=1)
    engine.register_pool("kv", kv, BLOCK_BYTES)
    await engine.start()
    print("META", base64.b64encode(engine.metadata()).decode(), flush=True)

    loop = asyncio.get_running_loop()
    eof = asyncio.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(eof.set)), daemon=True).start()
    eof_wait = asyncio.ensure_future(eof.wait())
    while True:
        notif = asyncio.ensure_future(engine.wait_notification())
        done, _ = await asyncio.wait({notif, eof_wait}, return_when=asyncio.FIRST_COMPLETED)
        if notif not in done:
            notif.cancel()
            break
        n = notif.result()
        print("NOTIF", n.sender, n.message.decode(), digest(kv), flush=True)
    await engine.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
