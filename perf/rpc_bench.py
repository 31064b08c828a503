"""Request plane vs bare asyncio TCP, side by side in one run (issue: foundation benchmark).

    python -m kvrelay.perf.rpc_bench [--messages 200000] [--round-trips 5000] [--repeats 3]

Both servers run in one child process (on uvloop, like kvrelay servers), the client in this process,
so each side has its own core. Baselines use the same loop and framing but nothing else:
- bare echo: 100-byte length-prefixed ping, echoed back by a StreamReader/StreamWriter server.
- bare stream: one request, then N length-prefixed 100-byte payloads written with StreamWriter.write
  (drain every 256), read with readexactly. No encoding, multiplexing, cancellation or flow control.
kvrelay: `RpcClient.unary` round trips and an `RpcClient.call` stream of N Structs with 100-byte data.
zmq: the alternative transport the issue asks to weigh, a DEALER/ROUTER stream of N raw 100-byte frames.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncGenerator

import msgspec
import zmq
import zmq.asyncio

from kvrelay.runtime import aio
from kvrelay.runtime.rpc import RpcClient, RpcServer

PAYLOAD = b"p" * 100


class Msg(msgspec.Struct, array_like=True):
    seq: int
    data: bytes


# -- server side (child process) ----------------------------------------------------------------------
async def _bare_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            size = int.from_bytes(await reader.readexactly(4), "big")
            body = await reader.readexactly(size)
            if body.startswith(b"STREAM "):
                frame = len(PAYLOAD).to_bytes(4, "big") + PAYLOAD
                for i in range(int(body[7:])):
                    writer.write(frame)
                    if i % 256 == 0:
                        await writer.drain()
            else:
                writer.write(size.to_bytes(4, "big") + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _echo(req: Msg) -> AsyncGenerator[Msg, None]:
    yield req


async def _stream(n: int) -> AsyncGenerator[Msg, None]:
    for i in range(n):
        yield Msg(i, PAYLOAD)


async def _zmq_router(sock) -> None:
    """ZMQ alternative considered for the request plane: ROUTER streams N multipart frames."""
    while True:
        ident, body = await sock.recv_multipart()
        for i in range(int(body)):
            await sock.send_multipart([ident, PAYLOAD], copy=False) if i % 1024 == 0 else \
                sock.send_multipart([ident, PAYLOAD], flags=zmq.NOBLOCK)


async def serve() -> None:
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDHWM, 0)
    zport = router.bind_to_random_port("tcp://127.0.0.1")
    asyncio.ensure_future(_zmq_router(router))
    bare = await asyncio.start_server(_bare_conn, "127.0.0.1", 0)
    rpc = RpcServer()
    rpc.add_endpoint("echo", _echo, Msg)
    rpc.add_endpoint("stream", _stream, int)
    await rpc.start()
    print(f"127.0.0.1:{bare.sockets[0].getsockname()[1]} {rpc.address} {zport}", flush=True)
    await asyncio.Event().wait()


# -- client side --------------------------------------------------------------------------------------
def _pct(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] * 1e6


async def bare_round_trips(addr: str, n: int) -> list[float]:
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    frame = len(PAYLOAD).to_bytes(4, "big") + PAYLOAD
    out = []
    for _ in range(n):
        t = time.perf_counter()
        writer.write(frame)
        size = int.from_bytes(await reader.readexactly(4), "big")
        await reader.readexactly(size)
        out.append(time.perf_counter() - t)
    writer.close()
    return out


async def bare_stream(addr: str, n: int) -> float:
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    req = f"STREAM {n}".encode()
    t = time.perf_counter()
    writer.write(len(req).to_bytes(4, "big") + req)
    for _ in range(n):
        size = int.from_bytes(await reader.readexactly(4), "big")
        await reader.readexactly(size)
    elapsed = time.perf_counter() - t
    writer.close()
    return n / elapsed


async def zmq_stream(port: str, n: int) -> float:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    t = time.perf_counter()
    await sock.send(str(n).encode())
    for _ in range(n):
        await sock.recv()
    elapsed = time.perf_counter() - t
    sock.close(linger=0)
    ctx.term()
    return n / elapsed


async def rpc_round_trips(client: RpcClient, addr: str, n: int) -> list[float]:
    out = []
    msg = Msg(0, PAYLOAD)
    for _ in range(n):
        t = time.perf_counter()
        await client.unary(addr, "echo", msg, Msg)
        out.append(time.perf_counter() - t)
    return out


async def rpc_stream(client: RpcClient, addr: str, n: int) -> float:
    t = time.perf_counter()
    count = 0
    async for _ in client.call(addr, "stream", n, Msg):
        count += 1
    assert count == n
    return n / (time.perf_counter() - t)


async def measure(bare_addr: str, rpc_addr: str, zmq_port: str, args: argparse.Namespace) -> dict:
    client = RpcClient()
    await rpc_round_trips(client, rpc_addr, 200)  # warm up connection and caches
    await bare_round_trips(bare_addr, 200)
    res: dict[str, list] = {k: [] for k in ("bare_rt", "rpc_rt", "bare_tput", "rpc_tput", "zmq_tput")}
    for _ in range(args.repeats):  # interleave so drift in machine load hits both sides alike
        res["bare_rt"] += await bare_round_trips(bare_addr, args.round_trips)
        res["rpc_rt"] += await rpc_round_trips(client, rpc_addr, args.round_trips)
        res["bare_tput"].append(await bare_stream(bare_addr, args.messages))
        res["rpc_tput"].append(await rpc_stream(client, rpc_addr, args.messages))
        res["zmq_tput"].append(await zmq_stream(zmq_port, args.messages))
    await client.close()
    bare_t, rpc_t = statistics.median(res["bare_tput"]), statistics.median(res["rpc_tput"])
    return {
        "bare_echo_rtt_us": {"p50": _pct(res["bare_rt"], 50), "p99": _pct(res["bare_rt"], 99)},
        "rpc_rtt_us": {"p50": _pct(res["rpc_rt"], 50), "p99": _pct(res["rpc_rt"], 99)},
        "bare_stream_msgs_per_s": bare_t,
        "rpc_stream_msgs_per_s": rpc_t,
        "zmq_dealer_router_msgs_per_s": statistics.median(res["zmq_tput"]),
        "throughput_ratio": rpc_t / bare_t,
        "messages": args.messages, "round_trips": args.round_trips, "repeats": args.repeats,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrelay.perf.rpc_bench")
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--round-trips", type=int, default=5_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        aio.run(serve())
        return 0
    child = subprocess.Popen([sys.executable, "-m", "kvrelay.perf.rpc_bench", "--serve"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None  # stdout=PIPE
    try:
        bare_addr, rpc_addr, zmq_port = child.stdout.readline().split()
        result = aio.run(measure(bare_addr, rpc_addr, zmq_port, args))
    finally:
        child.kill()
        child.wait()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    b, r = result["bare_echo_rtt_us"], result["rpc_rtt_us"]
    print(f"\n| | p50 RTT us | p99 RTT us | stream msgs/s |\n|---|---|---|---|\n"
          f"| bare asyncio TCP | {b['p50']:.1f} | {b['p99']:.1f} | {result['bare_stream_msgs_per_s']:,.0f} |\n"
          f"| kvrelay rpc | {r['p50']:.1f} | {r['p99']:.1f} | {result['rpc_stream_msgs_per_s']:,.0f} |\n"
          f"| zmq DEALER/ROUTER (no encoding) | | | {result['zmq_dealer_router_msgs_per_s']:,.0f} |\n"
          f"\nthroughput ratio rpc/bare: {result['throughput_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
