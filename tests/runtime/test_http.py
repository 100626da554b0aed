"""The shared HTTP server: keep-alive, limits, errors, timeouts, connection bound."""

from __future__ import annotations

import contextlib
from collections import Counter

import h11
import pytest
import trio
import trio.lowlevel
import trio.testing

from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.http import HttpConnectionHandler, HttpRequest, HttpResponse, serve_http

LOOPBACK = ListenAddr("127.0.0.1", 0)


async def echo(request: HttpRequest) -> HttpResponse:
    body = b"%s %s %d %s" % (request.method, request.target, len(request.body), request.client[0].encode())
    return HttpResponse(200, [(b"content-type", b"text/plain")], body)


class Client:
    """A tiny h11 client over a stream, to read responses exactly."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, method: bytes, target: bytes, body: bytes = b"", headers=()) -> tuple[int, bytes]:
        hdrs = [(b"host", b"test"), *headers]
        if body:
            hdrs.append((b"content-length", str(len(body)).encode()))
        data = self.conn.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await self.response()

    async def response(self) -> tuple[int, bytes]:
        status, chunks = 0, []
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                chunks.append(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return status, b"".join(chunks)


async def read_until_eof(stream: trio.abc.Stream) -> bytes:
    out = b""
    while chunk := await stream.receive_some(65536):
        out += chunk
    return out


async def start(nursery, handler=echo, **kw):
    errors: Counter[str] = Counter()
    addr = await nursery.start(
        lambda task_status: serve_http(
            handler, LOOPBACK, on_error=lambda r: errors.update([r]), task_status=task_status, **kw
        )
    )
    return addr, errors


async def test_keep_alive_serves_many_requests_on_one_connection():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr, errors = await start(nursery)
            assert addr.port != 0
            stream = await trio.open_tcp_stream(addr.host, addr.port)
            client = Client(stream)
            for i in range(500):
                status, body = await client.request(b"GET", b"/x?i=%d" % i)
                assert (status, body) == (200, b"GET /x?i=%d 0 127.0.0.1" % i)
            status, body = await client.request(b"POST", b"/p", body=b"abc")
            assert (status, body) == (200, b"POST /p 3 127.0.0.1")
            await stream.aclose()
            assert not errors
            nursery.cancel_scope.cancel()


async def test_pipelined_requests_are_answered_in_order():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr, _ = await start(nursery)
            stream = await trio.open_tcp_stream(addr.host, addr.port)
            await stream.send_all(
                b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            data = await read_until_eof(stream)
            assert data.count(b"HTTP/1.1 200") == 2
            assert data.index(b"GET /a") < data.index(b"GET /b")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "raw,status,reason",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n", 431, "too_large"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413, "too_large"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"a" * 1024 + b"\r\n" * 2,
         413, "too_large"),
        (b"GARBAGE\r\n\r\n", 400, "bad_http"),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400, "bad_http"),
    ],
)
async def test_oversize_and_malformed_requests_are_answered_counted_and_closed(raw, status, reason):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr, errors = await start(nursery, max_request_bytes=1024)
            stream = await trio.open_tcp_stream(addr.host, addr.port)
            await stream.send_all(raw)
            data = await read_until_eof(stream)  # the server closes
            assert data.startswith(b"HTTP/1.1 %d " % status), data
            assert errors == {reason: 1}
            # and it keeps serving others
            stream = await trio.open_tcp_stream(addr.host, addr.port)
            assert (await Client(stream).request(b"GET", b"/"))[0] == 200
            nursery.cancel_scope.cancel()


async def test_max_connections_refuses_the_extra_connection_promptly():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr, errors = await start(nursery, max_connections=2)
            held = []
            for _ in range(2):
                stream = await trio.open_tcp_stream(addr.host, addr.port)
                assert (await Client(stream).request(b"GET", b"/"))[0] == 200  # accepted and counted
                held.append(stream)
            extra = await trio.open_tcp_stream(addr.host, addr.port)
            with contextlib.suppress(trio.BrokenResourceError):
                await extra.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(trio.BrokenResourceError):  # closed, or reset
                assert await read_until_eof(extra) == b""  # closed without an answer
            assert errors == {"too_many_connections": 1}
            await held.pop().aclose()
            # a slot is free again (the server notices the close first)
            while True:
                stream = await trio.open_tcp_stream(addr.host, addr.port)
                try:
                    if (await Client(stream).request(b"GET", b"/"))[0] == 200:
                        break
                except (trio.BrokenResourceError, h11.RemoteProtocolError):
                    await trio.lowlevel.checkpoint()  # checkpoint; the close is in flight
            nursery.cancel_scope.cancel()


async def test_head_gets_no_body_and_the_connection_stays_usable():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr, _ = await start(nursery)
            client = Client(await trio.open_tcp_stream(addr.host, addr.port))
            assert await client.request(b"HEAD", b"/") == (200, b"")
            assert (await client.request(b"GET", b"/"))[0] == 200
            nursery.cancel_scope.cancel()


async def test_handler_exceptions_are_not_swallowed():
    async def broken(request):
        raise ZeroDivisionError("bug")

    with pytest.raises(BaseExceptionGroup) as info:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                addr, _ = await start(nursery, handler=broken)
                stream = await trio.open_tcp_stream(addr.host, addr.port)
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await trio.sleep_forever()
    assert info.group_contains(ZeroDivisionError, depth=None)


# -- timeouts, on memory streams with a fake clock ------------------------------


async def serve_memory(nursery, **kw) -> tuple[trio.abc.Stream, Counter[str]]:
    errors: Counter[str] = Counter()
    handler = HttpConnectionHandler(echo, on_error=lambda r: errors.update([r]), **kw)
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(handler, server)
    return client, errors


async def test_a_client_that_never_sends_a_request_times_out(autojump_clock):
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            client, errors = await serve_memory(nursery, idle_timeout=30.0)
            start = trio.current_time()
            assert await read_until_eof(client) == b""
            assert trio.current_time() - start == pytest.approx(30.0)
            assert errors == {"timeout": 1}


async def test_a_slow_request_times_out_as_a_whole(autojump_clock):
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            client, errors = await serve_memory(nursery, idle_timeout=30.0)
            start = trio.current_time()
            try:
                for ch in b"GET / HTTP/1.1\r\nHost: x\r\n":  # never finished
                    await client.send_all(bytes([ch]))
                    await trio.sleep(5)  # fake time: a slowloris drip
            except trio.BrokenResourceError:
                pass
            assert trio.current_time() - start <= 35
            assert errors == {"timeout": 1}


async def test_an_idle_keep_alive_connection_is_closed_quietly(autojump_clock):
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            stream, errors = await serve_memory(nursery, idle_timeout=30.0)
            client = Client(stream)
            assert (await client.request(b"GET", b"/"))[0] == 200
            assert await read_until_eof(stream) == b""
            assert not errors
