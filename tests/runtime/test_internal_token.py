"""Issue 14, the trust boundary: with the internal token set, the request plane and the TCP transfer
port run nothing for a caller that does not present it (no `generate`, no `kv_read`, no `kv_write`)."""

from __future__ import annotations

import msgspec
import pytest
import torch

from kvrelay.runtime.auth import InternalAuthConfig
from kvrelay.runtime.config import ConfigError
from kvrelay.runtime.rpc import RemoteError, RpcClient, RpcConnectionError, RpcServer
from kvrelay.transfer import TcpTransferEngine
from kvrelay.transfer.metadata import decode_metadata
from kvrelay.transfer.tcp_wire import ReadRequest, WriteRequest

TOKEN = "s3cret-internal"


class Ping(msgspec.Struct):
    n: int


async def echo(req: Ping):
    yield req


@pytest.fixture
async def server():
    srv = RpcServer(token=TOKEN)
    calls = []

    async def counted(req: Ping):
        calls.append(req.n)
        yield req

    srv.add_endpoint("echo", counted, Ping)
    await srv.start()
    srv.calls = calls
    yield srv
    await srv.close()


@pytest.mark.parametrize("token", ["", "wrong"])
async def test_calls_without_the_token_are_refused_and_never_run(server, token):
    client = RpcClient(token=token)
    try:
        with pytest.raises((RemoteError, RpcConnectionError)) as info:
            await client.unary(server.address, "echo", Ping(1), Ping)
        if isinstance(info.value, RemoteError):
            assert info.value.kind == "Unauthorized"
        assert server.calls == []
    finally:
        await client.close()


async def test_calls_with_the_token_run(server):
    client = RpcClient(token=TOKEN)
    try:
        assert (await client.unary(server.address, "echo", Ping(7), Ping)).n == 7
        assert [r.n for r in await client.call(server.address, "echo", Ping(8), Ping).collect()] == [8]
        assert server.calls == [7, 8]
    finally:
        await client.close()


async def test_a_server_without_token_accepts_a_client_that_has_one():
    srv = RpcServer()
    srv.add_endpoint("echo", echo, Ping)
    await srv.start()
    client = RpcClient(token=TOKEN)
    try:
        assert (await client.unary(srv.address, "echo", Ping(3), Ping)).n == 3
    finally:
        await client.close()
        await srv.close()


async def test_tcp_transfer_port_refuses_reads_and_writes_without_the_token():
    pool = (torch.arange(4 * 64) % 251).to(torch.uint8).reshape(4, 64)
    a, b = TcpTransferEngine("a", token=TOKEN), TcpTransferEngine("b", token=TOKEN)
    a.register_pool("kv", pool, 64)
    b_pool = torch.zeros((4, 64), dtype=torch.uint8)
    b.register_pool("kv", b_pool, 64)
    await a.start()
    await b.start()
    address = decode_metadata(a.metadata()).address
    intruder = RpcClient()
    try:
        b.add_peer("a", a.metadata())
        await b.read("a", "kv", [0, 1], "kv", [2, 3])  # peers holding the token transfer as before
        assert torch.equal(b_pool[2:], pool[:2])
        before = pool.clone()
        with pytest.raises((RemoteError, RpcConnectionError)):
            await intruder.call(address, "kv_read", ReadRequest(pool="kv", runs=[(0, 64)])).collect()
        with pytest.raises((RemoteError, RpcConnectionError)):
            await intruder.call(address, "kv_write", WriteRequest(pool="kv", offset=0, data=memoryview(b"\xff" * 64))).collect()
        assert torch.equal(pool, before)  # nothing was written
    finally:
        await intruder.close()
        await a.close()
        await b.close()


def test_token_from_a_file_wins_and_bad_files_are_config_errors(tmp_path):
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert InternalAuthConfig(internal_token="flag", internal_token_file=str(f)).token() == "from-file"
    assert InternalAuthConfig(internal_token="flag").token() == "flag"
    (tmp_path / "empty").write_text("")
    for path in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(ConfigError, match="--internal-token-file"):
            InternalAuthConfig(internal_token_file=str(path)).token()


async def test_one_wrong_auth_frame_closes_the_connection(server, caplog):
    """Issue 29: a probe tried 20,000 tokens in 0.54 s on one connection, unlogged. Now the first wrong
    `Auth` ends the connection (a call sent with it is answered Unauthorized first), it is logged, and
    repeated refusals from one host are one line a minute."""
    import asyncio

    from kvrelay.runtime.rpc.frames import Auth, FrameEncoder, _CallIn

    host, port = server.address.rsplit(":", 1)
    enc = FrameEncoder()
    with caplog.at_level("WARNING", logger="kvrelay.runtime.rpc.server"):
        for _ in range(3):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(enc.encode(Auth("guess-1")) + enc.encode(Auth(TOKEN))  # the right one comes too late
                         + enc.encode(_CallIn(1, "echo", msgspec.Raw(msgspec.msgpack.encode(Ping(5))))))
            await writer.drain()
            reply = await asyncio.wait_for(reader.read(), 5)  # read() returns at EOF: the server closed
            assert b"Unauthorized" in reply
            writer.close()
    assert server.calls == [] and server.refusals == 3
    refused = [r for r in caplog.records if "refused a wrong internal token" in r.getMessage()]
    assert len(refused) == 1, caplog.text  # rate-limited: one line per host per minute
    client = RpcClient(token=TOKEN)  # the right token on a fresh connection still works
    try:
        assert (await client.unary(server.address, "echo", Ping(9), Ping)).n == 9
    finally:
        await client.close()
