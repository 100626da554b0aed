"""The one minimal HTTP/1.1 server every Shoal daemon uses (h11 + trio).

It serves ``/metrics`` and the BitTorrent HTTP tracker, so it is built for
many small keep-alive requests from clients we do not trust:

* one trio task per connection, none per request; a request is read, handed to
  the handler, and its response written with one ``send_all``;
* every request (head *and* body) must fit in ``max_request_bytes``; a larger
  head gets 431, a larger body 413, and the connection is closed;
* malformed HTTP gets 400 and a close;
* a connection gets ``idle_timeout`` seconds to deliver each complete request
  (slowloris protection: the deadline covers the whole request, not each
  read) and the same to accept its response;
* at most ``max_connections`` connections are served at once; one more is
  closed right away, without reading it.

Each of those events is reported through ``on_error(reason)`` with a fixed
token from :data:`ERROR_REASONS`, which the daemon counts in its metrics.

The handler is a coroutine ``HttpRequest -> HttpResponse``. An exception
escaping it is a bug: it is *not* turned into a 500, it propagates and stops
the server (and so the daemon) loudly, per the architecture.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
import trio

from shoal.daemons.runtime.config import ListenAddr

__all__ = [
    "ERROR_REASONS",
    "HttpRequest",
    "HttpResponse",
    "HttpConnectionHandler",
    "bound_address",
    "open_listeners",
    "serve_http",
]

#: Tokens passed to ``on_error``; a bounded set for a metric label.
ERROR_REASONS = ("bad_http", "too_large", "timeout", "too_many_connections")

# A read of 64 KiB takes a whole pipelined burst in one syscall; the h11
# buffer is still bounded by max_request_bytes.
_RECEIVE_SIZE = 65536

_REASON = {s.value: s.phrase.encode() for s in HTTPStatus}


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased by h11
    body: bytes
    client: tuple[str, int]

    def header(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of header ``name`` (lower-case), or ``default``."""
        for k, v in self.headers:
            if k == name:
                return v
        return default


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class _Close(Exception):
    """Internal: stop serving this connection (after an error was reported)."""


def _plain(status: int, text: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return status, [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")], text.encode()


class HttpConnectionHandler:
    """Serves HTTP on any trio stream; :func:`serve_http` gives it TCP streams.

    Separate from the listener so tests can drive it over
    ``trio.testing.memory_stream_pair`` with a fake clock.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_request_bytes: int = 8192,
        idle_timeout: float = 30.0,
        max_connections: int = 1024,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        if max_request_bytes < 256:
            raise ValueError("max_request_bytes must be at least 256")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.handler = handler
        self.max_request_bytes = max_request_bytes
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.on_error = on_error
        self.connections = 0  # currently served

    def _report(self, reason: str) -> None:
        if self.on_error is not None:
            self.on_error(reason)

    async def __call__(self, stream: trio.abc.Stream) -> None:
        if self.connections >= self.max_connections:
            # Refuse promptly: no read, no response, just close. A client that
            # opens too many connections gets nothing to keep them busy with.
            self._report("too_many_connections")
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        try:
            await self._serve(stream)
        finally:
            self.connections -= 1

    async def _serve(self, stream: trio.abc.Stream) -> None:
        client = _peer(stream)
        # h11 bounds the head with max_incomplete_event_size; the body is
        # bounded below against what is left of the same budget.
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_request_bytes)
        served = 0
        try:
            while True:
                with trio.move_on_after(self.idle_timeout) as scope:
                    request = await self._read_request(stream, conn, client)
                if scope.cancelled_caught:
                    # A keep-alive connection that goes quiet after a complete
                    # exchange is normal and closed silently; a client that
                    # stalls mid-request, or never sends one, is counted.
                    if served == 0 or conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                        self._report("timeout")
                    return
                if request is None:  # clean EOF between requests
                    return
                response = await self.handler(request)
                data = self._encode(conn, request, response)
                with trio.move_on_after(self.idle_timeout) as scope:
                    await stream.send_all(data)
                if scope.cancelled_caught:
                    self._report("timeout")
                    return
                served += 1
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except _Close:
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the peer reset or vanished; nothing to answer
        finally:
            await trio.aclose_forcefully(stream)

    async def _next_event(self, stream: trio.abc.Stream, conn: h11.Connection) -> object:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                reason = "too_large" if status == 431 else "bad_http"
                await self._refuse(stream, conn, *_plain(status, f"{status} {reason}\n"), reason)
            if event is not h11.NEED_DATA:
                return event
            data = await stream.receive_some(_RECEIVE_SIZE)
            conn.receive_data(bytes(data))

    async def _read_request(
        self, stream: trio.abc.Stream, conn: h11.Connection, client: tuple[str, int]
    ) -> HttpRequest | None:
        event = await self._next_event(stream, conn)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        # What is left of the budget once the head is known. h11 does not
        # expose the head's size, so estimate it from the parsed fields.
        head = len(event.method) + len(event.target) + 16
        head += sum(len(k) + len(v) + 4 for k, v in event.headers)
        budget = self.max_request_bytes - head
        if budget < 0:
            # h11 only bounds an *incomplete* head; one that arrived whole in
            # a single read is checked here.
            await self._refuse(stream, conn, *_plain(431, "431 request header fields too large\n"), "too_large")
        for name, value in event.headers:
            if name == b"content-length" and int(value) > budget:
                await self._refuse(stream, conn, *_plain(413, "413 request too large\n"), "too_large")
        if conn.they_are_waiting_for_100_continue:
            await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        chunks: list[bytes] = []
        size = 0
        while True:
            part = await self._next_event(stream, conn)
            if isinstance(part, h11.Data):
                size += len(part.data)
                if size > budget:  # chunked bodies are only known as they come
                    await self._refuse(stream, conn, *_plain(413, "413 request too large\n"), "too_large")
                chunks.append(part.data)
            elif isinstance(part, h11.EndOfMessage):
                break
            else:  # ConnectionClosed mid-body is reported by h11 as an error
                raise _Close
        return HttpRequest(event.method, event.target, list(event.headers), b"".join(chunks), client)

    def _encode(self, conn: h11.Connection, request: HttpRequest, response: HttpResponse) -> bytes:
        body = response.body
        headers = [(k, v) for k, v in response.headers if k.lower() not in (b"content-length", b"transfer-encoding")]
        headers.append((b"content-length", str(len(body)).encode()))
        head = h11.Response(status_code=response.status, headers=headers, reason=_REASON.get(response.status, b""))
        parts = [conn.send(head)]
        if body and request.method != b"HEAD":
            parts.append(conn.send(h11.Data(data=body)))
        parts.append(conn.send(h11.EndOfMessage()))
        return b"".join(parts)

    async def _refuse(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        reason: str,
    ) -> None:
        """Answer ``status`` if HTTP still allows a response, report, close."""
        self._report(reason)
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            headers = headers + [(b"content-length", str(len(body)).encode())]
            try:
                data = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASON.get(status, b"")))
                data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                raise _Close from None
            # Bounded by the caller's deadline (idle_timeout).
            await stream.send_all(data)
        raise _Close


def _peer(stream: trio.abc.Stream) -> tuple[str, int]:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return ("", 0)
    try:
        addr = sock.getpeername()
    except OSError:
        return ("", 0)
    if isinstance(addr, tuple):
        return (str(addr[0]), int(addr[1]))
    return (str(addr), 0)


def bound_address(listener: trio.SocketListener) -> ListenAddr:
    """The address a listener is actually bound to (port 0 resolved)."""
    host, port = listener.socket.getsockname()[:2]
    return ListenAddr(host, port)


async def open_listeners(listen: ListenAddr, *, backlog: int | None = None) -> list[trio.SocketListener]:
    """Bind TCP listeners for ``listen``; an unusable address raises OSError naming it."""
    try:
        return await trio.open_tcp_listeners(listen.port, host=listen.host, backlog=backlog)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror}") from None
        raise


async def serve_http(
    handler: Handler,
    listen: ListenAddr,
    *,
    max_request_bytes: int = 8192,
    idle_timeout: float = 30.0,
    max_connections: int = 1024,
    on_error: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[ListenAddr] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``listen`` until cancelled; started with the bound address."""
    conn_handler = HttpConnectionHandler(
        handler,
        max_request_bytes=max_request_bytes,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        on_error=on_error,
    )
    listeners = await open_listeners(listen)
    task_status.started(bound_address(listeners[0]))
    # trio.serve_listeners runs one task per connection in its own nursery and
    # backs off on EMFILE/ENFILE instead of crashing.
    await trio.serve_listeners(conn_handler, listeners)
