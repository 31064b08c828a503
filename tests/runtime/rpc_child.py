"""A request-plane server in its own process, for tests that kill it. Prints its address, then serves."""

import asyncio
import sys

import msgspec

from kvrelay.runtime.rpc import RpcServer


class Tick(msgspec.Struct):
    n: int


async def ticks(request: bytes):
    n = 0
    while True:
        yield Tick(n)
        n += 1
        await asyncio.sleep(0.01)


async def main() -> None:
    server = RpcServer()
    server.add_endpoint("ticks", ticks)
    print(await server.start(), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
