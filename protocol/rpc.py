"""Shoal RPC framing: length-prefixed msgpack frames, sans-IO.

Theory of operation
-------------------

Every daemon-to-daemon RPC (everything except the BitTorrent wire and HTTP
tracker) is a stream of *frames*::

    +----------------+---------------------------------------------+
    | N: uint32 (BE) | N bytes: one msgpack array                  |
    +----------------+---------------------------------------------+

and the array is ``[version, kind, id, *fields]`` with ``version == 1``:

====================  ============================================  ==========
kind                  array                                         sent by
====================  ============================================  ==========
``REQUEST``   (0)     ``[1, 0, id, method: str, params]``           client
``RESPONSE``  (1)     ``[1, 1, id, result]``                        server
``ERROR``     (2)     ``[1, 2, id, code: str, message: str]``       server
``CHALLENGE`` (3)     ``[1, 3, 0, nonce: bin(32), server: str]``    server
``AUTH``      (4)     ``[1, 4, 0, mac: bin(0 or 32)]``              client
====================  ============================================  ==========

A connection starts with a handshake, always, even when no token is
configured (so both sides have one code path)::

    server -> CHALLENGE(nonce, server_name)
    client -> AUTH(mac)        mac = HMAC-SHA256(token, AUTH_CONTEXT + server_name + 0x00 + nonce)
                               or b"" when the client has no token
    server -> RESPONSE(id=0, result=True)          accepted
           or ERROR(id=0, "unauthorized", ...)     then the server closes

Id 0 is reserved for connection-level frames; requests use ids 1..2**32-1 and
a response carries the id of its request, so a client may have many requests
in flight on one connection and responses may come back in any order.

:class:`RpcConnection` is the state machine of one side (``CLIENT`` or
``SERVER``). Feed it bytes with :meth:`~RpcConnection.receive_data` (``b""``
means EOF), pull events with :meth:`~RpcConnection.next_event` until it returns
:data:`NEED_DATA`, and turn events into bytes with :meth:`~RpcConnection.send`.
It never does I/O, never looks at a clock and never draws random numbers:
the caller supplies the nonce and checks the MAC with :func:`verify_mac`.

Failure modes follow :mod:`shoal.protocol.errors`: anything wrong with the
peer's bytes raises :class:`RemoteProtocolError` whose ``reason`` is one of
:data:`REASONS`; misuse of the API (building an invalid event, sending out of
order, encoding a value msgpack cannot carry) raises
:class:`LocalProtocolError`. After a ``RemoteProtocolError`` the connection is
dead: every later ``next_event`` raises the same error again.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "VERSION",
    "REQUEST",
    "RESPONSE",
    "ERROR",
    "CHALLENGE",
    "AUTH",
    "CLIENT",
    "SERVER",
    "REASONS",
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "NONCE_SIZE",
    "MAC_SIZE",
    "MAX_ID",
    "MAX_METHOD_LEN",
    "MAX_CODE_LEN",
    "MAX_MESSAGE_LEN",
    "MAX_SERVER_NAME_LEN",
    "AUTH_CONTEXT",
    "NEED_DATA",
    "Request",
    "Response",
    "Error",
    "Challenge",
    "Auth",
    "ConnectionClosed",
    "Event",
    "RpcConnection",
    "compute_mac",
    "verify_mac",
]

VERSION: Final = 1

REQUEST: Final = 0
RESPONSE: Final = 1
ERROR: Final = 2
CHALLENGE: Final = 3
AUTH: Final = 4

CLIENT: Final = "client"
SERVER: Final = "server"

#: Every ``reason`` a RemoteProtocolError from this module can carry; used as
#: a metric label, so the set is fixed.
REASONS: Final = (
    "frame_too_large",  # length prefix above max_frame
    "bad_msgpack",  # body is not exactly one msgpack value, or uses ext types
    "bad_version",  # version field is not VERSION
    "bad_kind",  # kind is not one of the five kinds
    "bad_fields",  # wrong field count or a field fails validation
    "unexpected",  # a valid frame the peer may not send in this state
    "truncated",  # EOF in the middle of a frame
)

HEADER_SIZE: Final = 4
#: 1 MiB. Every frame is buffered whole before it is decoded, so this is the
#: memory one connection can pin; it is far above any RPC Shoal makes (bulk
#: data moves over the swarm, not over RPC) and small enough that a thousand
#: connections cannot exhaust a node.
DEFAULT_MAX_FRAME: Final = 1 << 20
#: The smallest max_frame that still fits a handshake and a useful request.
MIN_MAX_FRAME: Final = 256
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32  # SHA-256
MAX_ID: Final = 2**32 - 1
MAX_METHOD_LEN: Final = 64  # method names are identifiers, not data
MAX_CODE_LEN: Final = 64  # error codes are tokens ("busy", "timeout", ...)
MAX_MESSAGE_LEN: Final = 4096  # human-readable text; keep log lines sane
MAX_SERVER_NAME_LEN: Final = 64
#: Domain separation for the MAC, so a token shared with another protocol
#: can never be used to forge a Shoal handshake or vice versa.
AUTH_CONTEXT: Final = b"shoal-rpc-v1 auth\x00"

_FIELD_COUNTS: Final = {REQUEST: 5, RESPONSE: 4, ERROR: 5, CHALLENGE: 5, AUTH: 4}


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`RpcConnection.next_event` when more bytes are needed.
NEED_DATA: Final = _NeedData()


def _check_id(value: object, *, handshake: bool = False) -> None:
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise LocalProtocolError(f"id must be an int in 0..{MAX_ID}, got {value!r}", "bad_fields")
    if handshake and value != 0:
        raise LocalProtocolError("handshake frames carry id 0", "bad_fields")


def _check_token(name: str, value: object, limit: int) -> None:
    if type(value) is not str or not 0 < len(value) <= limit:
        raise LocalProtocolError(
            f"{name} must be a non-empty str of at most {limit} chars, got {value!r}", "bad_fields")


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    method: str
    params: Any = None

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_token("method", self.method, MAX_METHOD_LEN)


@dataclass(frozen=True, slots=True)
class Response:
    id: int
    result: Any = None

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True)
class Error:
    id: int
    code: str
    message: str = ""

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_token("code", self.code, MAX_CODE_LEN)
        if type(self.message) is not str or len(self.message) > MAX_MESSAGE_LEN:
            raise LocalProtocolError(f"message must be a str of at most {MAX_MESSAGE_LEN} chars", "bad_fields")


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes
    server_name: str

    def __post_init__(self) -> None:
        if type(self.nonce) is not bytes or len(self.nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes", "bad_fields")
        _check_token("server_name", self.server_name, MAX_SERVER_NAME_LEN)


@dataclass(frozen=True, slots=True)
class Auth:
    mac: bytes

    def __post_init__(self) -> None:
        if type(self.mac) is not bytes or len(self.mac) not in (0, MAC_SIZE):
            raise LocalProtocolError(f"mac must be empty or {MAC_SIZE} bytes", "bad_fields")


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side cleanly, between frames."""


Event = Request | Response | Error | Challenge | Auth | ConnectionClosed


def compute_mac(token: bytes, nonce: bytes, server_name: str) -> bytes:
    """The AUTH mac a client holding ``token`` sends for this challenge."""
    if not token:
        raise LocalProtocolError("an empty token authenticates nothing; use None", "bad_fields")
    msg = AUTH_CONTEXT + server_name.encode("utf-8") + b"\x00" + nonce
    return hmac.new(token, msg, hashlib.sha256).digest()


def verify_mac(token: bytes | None, nonce: bytes, server_name: str, mac: bytes) -> bool:
    """Server side of the handshake; constant-time.

    With ``token=None`` the listener needs no authentication and only an empty
    mac is accepted (a client that sends a mac expects a server that checks it;
    telling it otherwise would hide a misconfiguration).
    """
    if token is None:
        return mac == b""
    if len(mac) != MAC_SIZE:
        return False
    return hmac.compare_digest(mac, compute_mac(token, nonce, server_name))


def _reject_ext(code: int, data: bytes) -> Any:
    # ext types would let a peer make us build arbitrary objects; Shoal's RPC
    # values are plain msgpack (nil, bool, int, float, str, bin, array, map).
    raise ValueError(f"msgpack ext type {code} is not allowed")


# Bytes that start an ext or timestamp value. msgpack decodes ext type -1
# (timestamp) itself without calling ext_hook, so when one of these bytes
# appears in a body we walk the decoded value to reject Timestamp objects.
_EXT_MARKERS: Final = frozenset(b"\xc7\xc8\xc9\xd4\xd5\xd6\xd7\xd8")


def _contains_timestamp(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, msgpack.Timestamp):
            return True
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
    return False


class RpcConnection:
    """One side of an RPC connection: a frame codec plus the handshake order.

    ``role`` is :data:`CLIENT` or :data:`SERVER`. ``max_frame`` bounds the body
    of every frame in both directions (see :data:`DEFAULT_MAX_FRAME`).
    """

    def __init__(self, role: str, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if role not in (CLIENT, SERVER):
            raise LocalProtocolError(f"role must be {CLIENT!r} or {SERVER!r}", "bad_fields")
        if not MIN_MAX_FRAME <= max_frame <= 2**32 - 1:
            raise LocalProtocolError(f"max_frame must be in {MIN_MAX_FRAME}..2**32-1", "bad_fields")
        self.role = role
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # body length once the header is parsed
        self._eof = False
        self._closed_reported = False
        self._error: RemoteProtocolError | None = None
        # handshake progress
        self._challenge_sent = False  # server
        self._auth_received = False  # server
        self._challenge_received = False  # client
        self._auth_sent = False  # client

    # -- state ---------------------------------------------------------------

    @property
    def handshake_done(self) -> bool:
        """Server: AUTH received. Client: AUTH sent."""
        return self._auth_received if self.role == SERVER else self._auth_sent

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (bounded by max_frame + 4)."""
        return len(self._buf)

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self._eof:
            if data:
                raise LocalProtocolError("data received after EOF", "unexpected")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def _fail(self, message: str, reason: str) -> RemoteProtocolError:
        self._error = RemoteProtocolError(message, reason)
        self._buf.clear()
        return self._error

    def next_event(self) -> Event | _NeedData:
        """The next complete event, :data:`NEED_DATA`, or ConnectionClosed at EOF."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if self._need is None:
            if len(buf) < HEADER_SIZE:
                return self._at_short_buffer()
            n = int.from_bytes(buf[:HEADER_SIZE], "big")
            if n > self.max_frame:
                # Decided from the header alone: the body is never buffered.
                raise self._fail(f"frame of {n} bytes exceeds max_frame {self.max_frame}", "frame_too_large")
            self._need = n
        n = self._need
        if len(buf) < HEADER_SIZE + n:
            return self._at_short_buffer()
        body = bytes(buf[HEADER_SIZE : HEADER_SIZE + n])
        del buf[: HEADER_SIZE + n]
        self._need = None
        event = self._decode(body)
        self._check_receive_order(event)
        return event

    def _at_short_buffer(self) -> ConnectionClosed | _NeedData:
        if not self._eof:
            return NEED_DATA
        if self._buf:
            raise self._fail("connection closed in the middle of a frame", "truncated")
        self._closed_reported = True
        return ConnectionClosed()

    def _decode(self, body: bytes) -> Event:
        limit = self.max_frame
        try:
            obj = msgpack.unpackb(
                body,
                raw=False,
                # Every element costs at least one byte, so the frame size
                # bounds every container and string; stating it stops msgpack
                # from preallocating for a lying length field.
                max_bin_len=limit,
                max_str_len=limit,
                max_array_len=limit,
                max_map_len=limit // 2,
                max_ext_len=0,
                ext_hook=_reject_ext,
                # Params may be maps with int keys (piece indexes, ranks);
                # unhashable keys then fail with TypeError, caught below.
                strict_map_key=False,
            )
            if _EXT_MARKERS.intersection(body) and _contains_timestamp(obj):
                raise ValueError("msgpack timestamps are not allowed")
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise self._fail(f"undecodable frame body: {exc}", "bad_msgpack") from None
        if type(obj) is not list or len(obj) < 3:
            raise self._fail("frame is not an array [version, kind, id, ...]", "bad_fields")
        version, kind = obj[0], obj[1]
        if type(version) is not int or version != VERSION:
            raise self._fail(f"unsupported version {version!r}", "bad_version")
        if type(kind) is not int or kind not in _FIELD_COUNTS:
            raise self._fail(f"unknown frame kind {kind!r}", "bad_kind")
        if len(obj) != _FIELD_COUNTS[kind]:
            raise self._fail(f"kind {kind} needs {_FIELD_COUNTS[kind]} fields, got {len(obj)}", "bad_fields")
        try:
            if kind == REQUEST:
                return Request(obj[2], obj[3], obj[4])
            if kind == RESPONSE:
                return Response(obj[2], obj[3])
            if kind == ERROR:
                return Error(obj[2], obj[3], obj[4])
            _check_id(obj[2], handshake=True)
            if kind == CHALLENGE:
                return Challenge(obj[3], obj[4])
            return Auth(obj[3])
        except LocalProtocolError as exc:
            raise self._fail(str(exc), "bad_fields") from None

    def _check_receive_order(self, event: Event) -> None:
        if self.role == SERVER:
            if isinstance(event, Auth) and not self._auth_received:
                self._auth_received = True
                return
            if isinstance(event, Request) and self._auth_received and event.id != 0:
                return
        else:
            if isinstance(event, Challenge) and not self._challenge_received:
                self._challenge_received = True
                return
            if isinstance(event, Error) and (self._challenge_received or event.id == 0):
                return  # id 0: the server may refuse a connection at any time
            if isinstance(event, Response) and self._challenge_received:
                return
        raise self._fail(f"{type(event).__name__} not allowed here from the {_other(self.role)}", "unexpected")

    # -- sending -------------------------------------------------------------

    def send(self, event: Request | Response | Error | Challenge | Auth) -> bytes:
        """The bytes of one frame carrying ``event``."""
        self._check_send_order(event)
        if isinstance(event, Request):
            obj: list[Any] = [VERSION, REQUEST, event.id, event.method, event.params]
        elif isinstance(event, Response):
            obj = [VERSION, RESPONSE, event.id, event.result]
        elif isinstance(event, Error):
            obj = [VERSION, ERROR, event.id, event.code, event.message]
        elif isinstance(event, Challenge):
            obj = [VERSION, CHALLENGE, 0, event.nonce, event.server_name]
        else:
            obj = [VERSION, AUTH, 0, event.mac]
        try:
            body = msgpack.packb(obj, use_bin_type=True, datetime=False)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"cannot encode {type(event).__name__}: {exc}", "bad_fields") from None
        if len(body) > self.max_frame:
            raise LocalProtocolError(
                f"{type(event).__name__} of {len(body)} bytes exceeds max_frame {self.max_frame}", "frame_too_large"
            )
        # Commit the state change only once the frame is known to be sendable.
        if isinstance(event, Challenge):
            self._challenge_sent = True
        elif isinstance(event, Auth):
            self._auth_sent = True
        return len(body).to_bytes(HEADER_SIZE, "big") + body

    def _check_send_order(self, event: object) -> None:
        if self.role == SERVER:
            if isinstance(event, Error):
                return  # refusals (busy, unauthorized) are allowed at any time
            if isinstance(event, Challenge) and not self._challenge_sent:
                return
            if isinstance(event, Response) and self._auth_received:
                return
        else:
            if isinstance(event, Auth) and self._challenge_received and not self._auth_sent:
                return
            if isinstance(event, Request) and self._auth_sent and event.id != 0:
                return
        raise LocalProtocolError(f"a {self.role} may not send {type(event).__name__} now", "unexpected")


def _other(role: str) -> str:
    return CLIENT if role == SERVER else SERVER
