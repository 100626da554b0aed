"""The one RPC transport between Shoal daemons, on :mod:`shoal.protocol.rpc`.

Server
------
``RpcServer(handlers)`` maps method names to coroutines ``params -> result``
and serves them over TCP (:meth:`RpcServer.serve_tcp`) or a unix socket
(:meth:`RpcServer.serve_unix`). Per connection, in order:

1. the handshake, bounded by ``handshake_timeout``: CHALLENGE, AUTH, then
   RESPONSE(0) or ERROR(0, "unauthorized") and a close. A TCP listener off
   loopback refuses to start without a token (:class:`InsecureListenerError`);
   a unix socket is guarded by its file mode (0600 by default) instead.
2. a reader loop that turns each REQUEST into a task in the connection's
   nursery. The number of requests being processed is bounded server-wide by
   ``max_in_flight``; a request beyond it is answered ``busy`` at once instead
   of being queued, so a flood costs the server one small frame per request.
3. each request runs under ``request_timeout`` (→ ``timeout``); an unknown
   method is ``no_such_method``; a handler raising :class:`RpcError` sends that
   code and message.

A frame that breaks the protocol (``RemoteProtocolError``) is counted in
``rpc_errors_total{reason}``, answered with ERROR(0, reason) as a courtesy and
the connection closed; other connections are untouched.

Handler bugs. The architecture says "let everything else crash loudly", but an
RPC server that dies on the first bad input is a remote kill switch for the
whole daemon. So an unexpected exception from a handler is logged *with its
traceback* at ERROR, counted as ``rpc_errors_total{reason="internal"}`` and
``rpc_requests_total{result="internal"}``, and answered ``internal``; the
daemon keeps serving. It is never swallowed silently: alert on that counter.

Handlers
--------
There is one way to give a server its methods: decorate each with
:func:`rpc_method` (naming its :class:`~shoal.protocol.contract.Contract`) and
pass ``handlers_of(obj)``. The server decodes the params with the contract
before the handler runs, so a handler receives a validated, typed value and
every client sees ``bad_params`` with the field named for bad input. A
``BadParams`` raised inside a handler (a check that needs the daemon's state)
is answered the same way.

Client
------
``connect_tcp``/``connect_unix`` return an :class:`RpcClient` after the
handshake (a wrong token fails here with ``RpcError("unauthorized")``).
``call`` may be used from many tasks at once: ids match responses to calls.
There is no background reader task: whichever caller holds the read lock
reads frames and hands each response to its caller, so a client needs no
nursery and leaves nothing running when the last call returns.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import trio

from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.http import bound_address, open_listeners
from shoal.daemons.runtime.metrics import RuntimeMetrics
from shoal.protocol.contract import BadParams, Contract
from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError
from shoal.protocol.rpc import (
    CLIENT,
    DEFAULT_MAX_FRAME,
    MAX_ID,
    NEED_DATA,
    SERVER,
    Auth,
    Challenge,
    ConnectionClosed,
    Error,
    Request,
    Response,
    RpcConnection,
    compute_mac,
    verify_mac,
)

__all__ = [
    "rpc_method",
    "handlers_of",
    "RpcError",
    "RpcConnectionError",
    "InsecureListenerError",
    "RpcServer",
    "RpcClient",
    "connect_tcp",
    "connect_unix",
    "open_client",
]

log = logging.getLogger("shoal.rpc")

_RECEIVE_SIZE = 65536
Handler = Callable[[Any], Awaitable[Any]]


def rpc_method(name: str, contract: type[Contract] | None = None):
    """Mark a coroutine method as the RPC method ``name`` taking ``contract``.

    With a contract, the handler is called with ``contract.decode(params)``;
    without one it must take no parameters (anything but nil or {} is refused).
    """

    def mark(fn):
        fn.__rpc__ = (name, contract)
        return fn

    return mark


def handlers_of(*objs: object) -> dict[str, Handler]:
    """The handlers of every :func:`rpc_method` of ``objs``, by method name."""
    out: dict[str, Handler] = {}
    for obj in objs:
        for attr in dir(type(obj)):
            fn = getattr(type(obj), attr, None)
            mark = getattr(fn, "__rpc__", None)
            if mark is None:
                continue
            name, contract = mark
            if name in out:
                raise ValueError(f"two handlers for RPC method {name!r}")
            out[name] = _bind(getattr(obj, attr), contract)
    return out


def _bind(method, contract: type[Contract] | None) -> Handler:
    async def handler(params: Any) -> Any:
        if contract is None:
            if params not in (None, {}):
                raise BadParams("this method takes no parameters")
            return await method()
        return await method(contract.decode(params))

    handler.__name__ = getattr(method, "__name__", "handler")
    return handler


class RpcError(Exception):
    """An ERROR frame: ``code`` is a short token, ``message`` text for humans."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class RpcConnectionError(RpcError):
    """The connection itself failed (closed, refused, unauthorized, bad frames);
    every call on it fails the same way from then on."""


class InsecureListenerError(ValueError):
    """An RPC listener reachable from the network was configured without a token."""


async def _next_event(stream: trio.abc.Stream, conn: RpcConnection) -> Any:
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))


class RpcServer:
    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        metrics: RuntimeMetrics | None = None,
        token: bytes | None = None,
        max_in_flight: int = 64,
        request_timeout: float = 30.0,
        handshake_timeout: float = 10.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        name: str = "shoal",
    ) -> None:
        if token is not None and len(token) < 16:
            raise ValueError("an RPC token must be at least 16 bytes (use None for no authentication)")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.handlers = dict(handlers)
        self.metrics = metrics
        self.token = token
        self.max_in_flight = max_in_flight
        self.request_timeout = request_timeout
        self.handshake_timeout = handshake_timeout
        self.max_frame = max_frame
        self.name = name
        self.in_flight = 0
        RpcConnection(SERVER, max_frame=max_frame)  # validates max_frame now, not per connection
        Challenge(b"\0" * 32, name)  # and the server name

    # -- metrics ---------------------------------------------------------------

    def _count_request(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.rpc_requests.labels(result=result).inc()

    def _count_error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rpc_errors.labels(reason=reason).inc()

    def _set_in_flight(self, delta: int) -> None:
        self.in_flight += delta
        if self.metrics is not None:
            self.metrics.rpc_in_flight.set(self.in_flight)

    # -- listeners -------------------------------------------------------------

    async def serve_tcp(
        self, listen: ListenAddr, *, task_status: trio.TaskStatus[ListenAddr] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve on TCP until cancelled; started with the bound address."""
        if self.token is None and not listen.is_loopback:
            raise InsecureListenerError(
                f"refusing to serve RPC on {listen} without a token: anyone who can reach it could call it; "
                "configure a token or listen on loopback"
            )
        listeners = await open_listeners(listen)
        task_status.started(bound_address(listeners[0]))
        await trio.serve_listeners(self.handle_stream, listeners)

    async def serve_unix(
        self,
        path: str | os.PathLike[str],
        *,
        mode: int = 0o600,
        on_connect: Callable[[trio.SocketStream], None] | None = None,
        task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on a unix socket at ``path`` (file mode ``mode``) until cancelled.

        ``on_connect(stream)`` runs first in each connection's task (the
        dispatcher reads SO_PEERCRED there into a context variable its handlers
        see); an OSError from it closes that connection.
        """
        path = Path(path)
        try:
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # a stale socket from a previous run
            else:
                raise FileExistsError(f"{path} exists and is not a socket")
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        inode: int | None = None
        try:
            await sock.bind(str(path))
            # Before listen(): until then no one can connect, so there is no
            # window in which the socket is reachable with the umask's mode.
            os.chmod(path, mode)
            sock.listen(socket.SOMAXCONN)
            inode = path.stat().st_ino
            listener = trio.SocketListener(sock)
            task_status.started(path)
            serve = self.handle_stream if on_connect is None else partial(self._handle_checked, on_connect)
            await trio.serve_listeners(serve, [listener])
        finally:
            sock.close()
            try:
                if path.stat().st_ino == inode:
                    path.unlink()
            except OSError:
                pass

    # -- one connection ----------------------------------------------------------

    async def _handle_checked(self, on_connect: Callable[[trio.SocketStream], None],
                              stream: trio.SocketStream) -> None:
        try:
            on_connect(stream)
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        await self.handle_stream(stream)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection (any trio stream) until it closes or fails."""
        conn = RpcConnection(SERVER, max_frame=self.max_frame)
        try:
            with trio.move_on_after(self.handshake_timeout) as scope:
                accepted = await self._handshake(stream, conn)
            if scope.cancelled_caught:
                self._count_error("handshake_timeout")
                return
            if not accepted:
                return
            send_lock = trio.Lock()
            async with trio.open_nursery() as nursery:
                try:
                    await self._read_loop(stream, conn, send_lock, nursery)
                except RemoteProtocolError as exc:
                    await self._protocol_error(stream, conn, send_lock, exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                # EOF or error: requests still running have no one to answer.
                nursery.cancel_scope.cancel()
        except RemoteProtocolError as exc:  # during the handshake
            await self._protocol_error(stream, conn, None, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _handshake(self, stream: trio.abc.Stream, conn: RpcConnection) -> bool:
        nonce = secrets.token_bytes(32)
        await stream.send_all(conn.send(Challenge(nonce, self.name)))
        event = await _next_event(stream, conn)
        if isinstance(event, ConnectionClosed):
            return False
        assert isinstance(event, Auth), event  # the codec allows nothing else first
        if not verify_mac(self.token, nonce, self.name, event.mac):
            self._count_error("unauthorized")
            await stream.send_all(conn.send(Error(0, "unauthorized", "bad or missing token")))
            return False
        await stream.send_all(conn.send(Response(0, True)))
        return True

    async def _protocol_error(
        self, stream: trio.abc.Stream, conn: RpcConnection, lock: trio.Lock | None, exc: RemoteProtocolError
    ) -> None:
        self._count_error(exc.reason)
        log.debug("closing RPC connection: %s (%s)", exc, exc.reason)
        data = conn.send(Error(0, exc.reason, str(exc)[:200]))
        # A courtesy for whoever debugs the client; not worth waiting for.
        with trio.move_on_after(1.0):
            try:
                if lock is None:
                    await stream.send_all(data)
                else:
                    async with lock:
                        await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _read_loop(
        self, stream: trio.abc.Stream, conn: RpcConnection, send_lock: trio.Lock, nursery: trio.Nursery
    ) -> None:
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, ConnectionClosed):
                return
            assert isinstance(event, Request), event
            handler = self.handlers.get(event.method)
            if handler is None:
                self._count_request("no_such_method")
                await self._reply(stream, conn, send_lock, Error(event.id, "no_such_method", event.method), nursery)
            elif self.in_flight >= self.max_in_flight:
                self._count_request("busy")
                busy = Error(event.id, "busy", "too many requests in flight")
                await self._reply(stream, conn, send_lock, busy, nursery)
            else:
                self._set_in_flight(+1)
                nursery.start_soon(self._run_request, handler, event, stream, conn, send_lock, nursery)

    async def _run_request(
        self,
        handler: Handler,
        request: Request,
        stream: trio.abc.Stream,
        conn: RpcConnection,
        send_lock: trio.Lock,
        nursery: trio.Nursery,
    ) -> None:
        try:
            reply: Response | Error
            try:
                with trio.move_on_after(self.request_timeout) as scope:
                    result = await handler(request.params)
            except RpcError as exc:
                self._count_request("error")
                reply = Error(request.id, _token(exc.code), exc.message[:4096])
            except BadParams as exc:
                self._count_request("error")
                reply = Error(request.id, "bad_params", str(exc)[:4096])
            except Exception:
                # See the module docstring: logged loudly, counted, answered.
                log.exception("RPC handler for %r failed", request.method)
                self._count_error("internal")
                self._count_request("internal")
                reply = Error(request.id, "internal", "the handler failed; see the server log")
            else:
                if scope.cancelled_caught:
                    self._count_request("timeout")
                    reply = Error(request.id, "timeout", f"no result within {self.request_timeout}s")
                else:
                    self._count_request("ok")
                    reply = Response(request.id, result)
            await self._reply(stream, conn, send_lock, reply, nursery)
        finally:
            self._set_in_flight(-1)

    async def _reply(
        self,
        stream: trio.abc.Stream,
        conn: RpcConnection,
        send_lock: trio.Lock,
        event: Response | Error,
        nursery: trio.Nursery,
    ) -> None:
        try:
            data = conn.send(event)
        except LocalProtocolError as exc:
            # The handler returned something msgpack cannot carry or too big.
            log.error("RPC result for id %d cannot be sent: %s", event.id, exc)
            self._count_error("bad_result")
            data = conn.send(Error(event.id, "internal", "the result could not be encoded"))
        try:
            async with send_lock:
                # A peer that stops reading must not pin a request slot forever.
                with trio.move_on_after(self.request_timeout) as scope:
                    await stream.send_all(data)
            if scope.cancelled_caught:
                self._count_error("send_timeout")
                nursery.cancel_scope.cancel()  # the stream is mid-frame now: drop it
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            nursery.cancel_scope.cancel()


def _token(code: object) -> str:
    return code if isinstance(code, str) and 0 < len(code) <= 64 else "error"


class _Call:
    __slots__ = ("done", "result", "error")

    def __init__(self) -> None:
        self.done = False
        self.result: Any = None
        self.error: RpcError | None = None


class RpcClient:
    """One authenticated connection; use :func:`connect_tcp` / :func:`connect_unix`."""

    def __init__(self, stream: trio.abc.Stream, conn: RpcConnection) -> None:
        self._stream = stream
        self._conn = conn
        self._next_id = 1
        self._calls: dict[int, _Call] = {}
        self._send_lock = trio.Lock()
        self._read_lock = trio.Lock()
        self._broken: tuple[str, str] | None = None

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._broken is None:
            self._broken = ("closed", "the client was closed")
        await trio.aclose_forcefully(self._stream)

    def _fail(self, code: str, message: str) -> RpcConnectionError:
        if self._broken is None:
            self._broken = (code, message)
        for call in self._calls.values():
            if not call.done:
                call.done = True
                call.error = RpcConnectionError(*self._broken)
        return RpcConnectionError(*self._broken)

    def _allocate_id(self) -> int:
        while True:
            i = self._next_id
            self._next_id = i % MAX_ID + 1
            if i not in self._calls:
                return i

    async def call(self, method: str, params: Any = None, *, timeout: float = 30.0) -> Any:
        """Call ``method``; raise :class:`RpcError` for an ERROR frame or a local timeout."""
        if self._broken is not None:
            raise RpcConnectionError(*self._broken)
        call_id = self._allocate_id()
        data = self._conn.send(Request(call_id, method, params))  # LocalProtocolError: our bug
        call = _Call()
        self._calls[call_id] = call
        try:
            with trio.move_on_after(timeout) as scope:
                async with self._send_lock:
                    try:
                        await self._stream.send_all(data)
                    except BaseException:
                        # Cancelled or failed mid-frame: the stream is unusable.
                        self._fail("connection_lost", "a send was interrupted")
                        await trio.aclose_forcefully(self._stream)
                        raise
                while not call.done:
                    async with self._read_lock:
                        if call.done:
                            break
                        if self._broken is not None:
                            raise RpcConnectionError(*self._broken)
                        await self._read_some()
            if scope.cancelled_caught and not call.done:
                raise RpcError("timeout", f"no response to {method!r} within {timeout}s")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._fail("connection_lost", str(exc) or type(exc).__name__) from None
        finally:
            self._calls.pop(call_id, None)
        if call.error is not None:
            raise call.error
        return call.result

    async def _read_some(self) -> None:
        """Read and dispatch at least one frame (the caller holds the read lock)."""
        dispatched = False
        while True:
            try:
                event = self._conn.next_event()
            except RemoteProtocolError as exc:
                raise self._fail(exc.reason, str(exc)) from None
            if event is NEED_DATA:
                if dispatched:
                    return
                try:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise self._fail("connection_lost", str(exc) or type(exc).__name__) from None
                self._conn.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                raise self._fail("connection_lost", "the server closed the connection")
            if event.id == 0:  # connection-level: the server is closing on us
                assert isinstance(event, Error), event
                raise self._fail(event.code, event.message)
            call = self._calls.get(event.id)
            if call is not None:  # else: a late answer to a call that timed out
                call.done = True
                if isinstance(event, Error):
                    call.error = RpcError(event.code, event.message)
                else:
                    call.result = event.result
            dispatched = True


async def _client_handshake(stream: trio.abc.Stream, token: bytes | None, max_frame: int) -> RpcClient:
    conn = RpcConnection(CLIENT, max_frame=max_frame)
    try:
        event = await _next_event(stream, conn)
        if isinstance(event, Challenge):
            mac = compute_mac(token, event.nonce, event.server_name) if token else b""
            await stream.send_all(conn.send(Auth(mac)))
            event = await _next_event(stream, conn)
            if isinstance(event, Response) and event.id == 0:
                return RpcClient(stream, conn)
        if isinstance(event, Error):
            raise RpcConnectionError(event.code, event.message)
        raise RpcConnectionError("connection_lost", "the server closed the connection during the handshake")
    except RemoteProtocolError as exc:
        raise RpcConnectionError(exc.reason, str(exc)) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise RpcConnectionError("connection_lost", str(exc) or type(exc).__name__) from None


async def open_client(
    stream: trio.abc.Stream, *, token: bytes | None = None, timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME
) -> RpcClient:
    """Run the client handshake on an open stream (any trio stream; tests use memory streams)."""
    return await _connect(partial(_return, stream), token, timeout, max_frame, "the server")


async def _return(stream: trio.abc.Stream) -> trio.abc.Stream:
    return stream


async def _connect(open_stream: Callable[[], Awaitable[trio.abc.Stream]], token: bytes | None, timeout: float,
                   max_frame: int, what: str) -> RpcClient:
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(timeout):
            stream = await open_stream()
            return await _client_handshake(stream, token, max_frame)
    except trio.TooSlowError:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise RpcConnectionError("timeout", f"no handshake with {what} within {timeout}s") from None
    except BaseException:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise


async def connect_tcp(
    listen: ListenAddr, *, token: bytes | None = None, timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME
) -> RpcClient:
    """Connect and authenticate; OSError if the connection is refused."""
    return await _connect(partial(trio.open_tcp_stream, listen.host, listen.port), token, timeout, max_frame,
                          str(listen))


async def connect_unix(
    path: str | os.PathLike[str],
    *,
    token: bytes | None = None,
    timeout: float = 10.0,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> RpcClient:
    return await _connect(partial(trio.open_unix_socket, os.fspath(path)), token, timeout, max_frame, os.fspath(path))
