"""The RPC transport: over unix and TCP sockets, and over memory streams with a fake clock."""

from __future__ import annotations

import stat
from functools import partial

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.metrics import runtime_metrics
from shoal.daemons.runtime.rpc import (
    InsecureListenerError,
    RpcConnectionError,
    RpcError,
    RpcServer,
    connect_tcp,
    connect_unix,
    open_client,
)
from shoal.protocol.rpc import CLIENT, Auth, Challenge, Error, RpcConnection

TOKEN = b"k" * 32


async def echo(params):
    return params


async def fail(params):
    raise RpcError("nope", "said no")


async def bug(params):
    raise ZeroDivisionError("a bug")


async def never(params):
    await trio.sleep_forever()


def make_server(**kw):
    registry = CollectorRegistry()
    metrics = runtime_metrics(registry, "test")
    handlers = {"echo": echo, "fail": fail, "bug": bug, "never": never, **kw.pop("handlers", {})}
    return RpcServer(handlers, metrics=metrics, **kw), registry


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0


@pytest.fixture
async def unix_server(tmp_path):
    server, registry = make_server()
    path = tmp_path / "rpc.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(server.serve_unix, path))
        yield server, registry, path
        nursery.cancel_scope.cancel()


async def test_call_response_errors_and_socket_mode(unix_server):
    server, registry, path = unix_server
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with trio.fail_after(10):
        async with await connect_unix(path) as client:
            params = {"a": [1, 2.5, None, True, b"\x00", "s"], 7: {"nested": []}}
            assert await client.call("echo", params) == params
            with pytest.raises(RpcError) as info:
                await client.call("missing")
            assert info.value.code == "no_such_method"
            with pytest.raises(RpcError) as info:
                await client.call("fail")
            assert (info.value.code, info.value.message) == ("nope", "said no")
            with pytest.raises(RpcError) as info:
                await client.call("bug")
            assert info.value.code == "internal"
            assert await client.call("echo", 1) == 1  # still serving
    assert value(registry, "shoal_test_rpc_requests_total", result="ok") == 2
    assert value(registry, "shoal_test_rpc_requests_total", result="no_such_method") == 1
    assert value(registry, "shoal_test_rpc_requests_total", result="error") == 1
    assert value(registry, "shoal_test_rpc_requests_total", result="internal") == 1
    assert value(registry, "shoal_test_rpc_errors_total", reason="internal") == 1
    assert value(registry, "shoal_test_rpc_in_flight") == 0


async def test_concurrent_calls_on_one_connection_are_processed_concurrently(tmp_path):
    n = 8
    arrived = 0
    all_here = trio.Event()

    async def gather(params):
        nonlocal arrived
        arrived += 1
        if arrived == n:
            all_here.set()
        await all_here.wait()  # deadlocks unless all n run at once
        return params * 2

    server, _ = make_server(handlers={"gather": gather})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.serve_unix, tmp_path / "s"))
            results = {}
            async with await connect_unix(tmp_path / "s") as client, trio.open_nursery() as calls:
                for i in range(n):

                    async def one(i=i):
                        results[i] = await client.call("gather", i)

                    calls.start_soon(one)
            assert results == {i: 2 * i for i in range(n)}
            nursery.cancel_scope.cancel()


async def test_tcp_auth_with_a_token(tmp_path):
    server, registry = make_server(token=TOKEN, name="authd")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(partial(server.serve_tcp, ListenAddr("127.0.0.1", 0)))
            async with await connect_tcp(addr, token=TOKEN) as client:
                assert await client.call("echo", "x") == "x"
            for bad in (None, b"w" * 32):
                with pytest.raises(RpcConnectionError) as info:
                    await connect_tcp(addr, token=bad)
                assert info.value.code == "unauthorized"
            assert value(registry, "shoal_test_rpc_errors_total", reason="unauthorized") == 2
            nursery.cancel_scope.cancel()


async def test_a_client_with_a_token_is_refused_by_a_server_without_one(unix_server):
    _, registry, path = unix_server
    with trio.fail_after(10):
        with pytest.raises(RpcConnectionError, match="unauthorized"):
            await connect_unix(path, token=TOKEN)


async def test_non_loopback_tcp_without_a_token_refuses_to_start():
    server, _ = make_server()
    with pytest.raises(InsecureListenerError, match="without a token"):
        await server.serve_tcp(ListenAddr("0.0.0.0", 0))


async def test_bad_frames_are_counted_and_close_only_that_connection(unix_server):
    _, registry, path = unix_server
    with trio.fail_after(10):
        async with await connect_unix(path) as good:
            stream = await trio.open_unix_socket(str(path))
            conn = RpcConnection(CLIENT)
            conn.receive_data(await stream.receive_some(65536))
            assert isinstance(conn.next_event(), Challenge)
            await stream.send_all(conn.send(Auth(b"")))
            await stream.send_all(b"\x00\x00\x00\x04\x93\x07\x00\x01")  # [7, 0, 1]: version 7
            data = b""
            while chunk := await stream.receive_some(65536):  # until the server closes
                data += chunk
            conn.receive_data(data)
            assert conn.next_event().id == 0  # the welcome
            error = conn.next_event()
            assert isinstance(error, Error) and (error.id, error.code) == (0, "bad_version")
            assert value(registry, "shoal_test_rpc_errors_total", reason="bad_version") == 1
            # an oversize prefix, before the handshake even
            stream = await trio.open_unix_socket(str(path))
            await stream.send_all(b"\xff\xff\xff\xff")
            while await stream.receive_some(65536):
                pass
            assert value(registry, "shoal_test_rpc_errors_total", reason="frame_too_large") == 1
            assert await good.call("echo", "still here") == "still here"


# -- timed behaviour, on memory streams with a fake clock ------------------------


async def connected(nursery, server, **kw):
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_stream, server_stream)
    return await open_client(client_stream, **kw)


async def test_request_timeout(autojump_clock):
    server, registry = make_server(request_timeout=5.0)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            client = await connected(nursery, server)
            start = trio.current_time()
            with pytest.raises(RpcError) as info:
                await client.call("never")
            assert info.value.code == "timeout"
            assert trio.current_time() - start == pytest.approx(5.0)
            # the client's own timeout, shorter than the server's
            with pytest.raises(RpcError, match="timeout"):
                await client.call("never", timeout=1.0)
            assert await client.call("echo", 3) == 3
            await client.aclose()
    # the second one was still running when the client closed: cancelled, not timed out
    assert value(registry, "shoal_test_rpc_requests_total", result="timeout") == 1


async def test_busy_beyond_max_in_flight(autojump_clock):
    release = trio.Event()

    async def block(params):
        await release.wait()
        return "done"

    server, registry = make_server(max_in_flight=2, handlers={"block": block})
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            client = await connected(nursery, server)
            other = await connected(nursery, server)  # the bound is server-wide
            results = []
            for _ in range(2):
                nursery.start_soon(lambda: _append(results, client.call("block")))
            await trio.testing.wait_all_tasks_blocked()
            assert server.in_flight == 2
            with pytest.raises(RpcError) as info:
                await other.call("echo", 1)
            assert info.value.code == "busy"
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert results == ["done", "done"]
            assert await other.call("echo", 1) == 1
            await client.aclose()
            await other.aclose()
    assert value(registry, "shoal_test_rpc_requests_total", result="busy") == 1


async def _append(results, coro):
    results.append(await coro)


async def test_handshake_timeout(autojump_clock):
    server, registry = make_server(handshake_timeout=3.0)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            client_stream, server_stream = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_stream, server_stream)
            data = b""
            while chunk := await client_stream.receive_some(65536):  # the challenge, then EOF
                data += chunk
            assert trio.current_time() == pytest.approx(3.0)
    assert value(registry, "shoal_test_rpc_errors_total", reason="handshake_timeout") == 1


async def test_server_closing_fails_pending_calls(autojump_clock):
    server, _ = make_server()
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            client_stream, server_stream = trio.testing.memory_stream_pair()
            scope = trio.CancelScope()

            async def serve_then_stop():
                with scope:
                    await server.handle_stream(server_stream)

            nursery.start_soon(serve_then_stop)
            client = await open_client(client_stream)
            async with trio.open_nursery() as calls:
                calls.start_soon(lambda: _expect_lost(client))
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
            with pytest.raises(RpcConnectionError):
                await client.call("echo")


async def _expect_lost(client):
    with pytest.raises(RpcConnectionError) as info:
        await client.call("never")
    assert info.value.code == "connection_lost"


async def test_a_long_poll_does_not_hold_up_a_short_call_on_the_same_connection(tmp_path):
    """The caller that holds the read lock reads the other caller's answer; the other
    caller must return then, not when the long poll's own answer comes."""
    release = trio.Event()

    async def poll(params):
        await release.wait()
        return "polled"

    async def quick(params):
        return "quick"

    server, _ = make_server(handlers={"poll": poll, "quick": quick})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.serve_unix, tmp_path / "s"))
            async with await connect_unix(tmp_path / "s") as client:
                async with trio.open_nursery() as calls:
                    got = {}

                    async def long():
                        got["poll"] = await client.call("poll")

                    calls.start_soon(long)
                    await trio.testing.wait_all_tasks_blocked()  # the poll is reading
                    assert await client.call("quick") == "quick"
                    assert "poll" not in got  # returned while the poll still waits
                    release.set()
                assert got == {"poll": "polled"}
            nursery.cancel_scope.cancel()
