"""The RPC frame codec: golden bytes, byte-at-a-time feeding, round-trips, fuzz."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError
from shoal.protocol.rpc import (
    CLIENT,
    MAX_ID,
    NEED_DATA,
    REASONS,
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

NONCE = bytes(range(32))
TOKEN = b"t" * 32


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def pair(max_frame: int = 1 << 20) -> tuple[RpcConnection, RpcConnection]:
    """A server and a client past the handshake."""
    server, client = RpcConnection(SERVER, max_frame=max_frame), RpcConnection(CLIENT, max_frame=max_frame)
    client.receive_data(server.send(Challenge(NONCE, "srv")))
    assert client.next_event() == Challenge(NONCE, "srv")
    server.receive_data(client.send(Auth(b"")))
    assert server.next_event() == Auth(b"")
    client.receive_data(server.send(Response(0, True)))
    assert client.next_event() == Response(0, True)
    return server, client


def drain(conn: RpcConnection) -> list[object]:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
    return out


# -- golden bytes -----------------------------------------------------------------

GOLDEN_CLIENT = [
    (Request(1, "ping", None), frame(b"\x95\x01\x00\x01\xa4ping\xc0")),
    (Request(2**32 - 1, "m", {"a": [1, b"\x00"]}),
     frame(b"\x95\x01\x00\xce\xff\xff\xff\xff\xa1m\x81\xa1a\x92\x01\xc4\x01\x00")),
]
GOLDEN_SERVER = [
    (Response(7, "ok"), frame(b"\x94\x01\x01\x07\xa2ok")),
    (Error(7, "busy", "x"), frame(b"\x95\x01\x02\x07\xa4busy\xa1x")),
]
GOLDEN_CHALLENGE = (Challenge(b"\x00" * 32, "s"), frame(b"\x95\x01\x03\x00\xc4\x20" + b"\x00" * 32 + b"\xa1s"))
GOLDEN_AUTH = (Auth(b""), frame(b"\x94\x01\x04\x00\xc4\x00"))


def test_golden_handshake_bytes():
    server, client = RpcConnection(SERVER), RpcConnection(CLIENT)
    event, data = GOLDEN_CHALLENGE
    assert server.send(event) == data
    client.receive_data(data)
    assert client.next_event() == event
    event, data = GOLDEN_AUTH
    assert client.send(event) == data
    server.receive_data(data)
    assert server.next_event() == event


@pytest.mark.parametrize("event,data", GOLDEN_CLIENT)
def test_golden_client_frames(event, data):
    server, client = pair()
    assert client.send(event) == data
    server.receive_data(data)
    assert server.next_event() == event
    assert server.next_event() is NEED_DATA


@pytest.mark.parametrize("event,data", GOLDEN_SERVER)
def test_golden_server_frames(event, data):
    server, client = pair()
    assert server.send(event) == data
    client.receive_data(data)
    assert client.next_event() == event


def test_byte_at_a_time_feeding_gives_the_same_events():
    server, client = pair()
    data = b"".join(d for _, d in GOLDEN_CLIENT) * 3
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
    whole = drain(server)
    server2, _ = pair()
    events = []
    for i in range(len(data)):
        server2.receive_data(data[i : i + 1])
        events.extend(drain(server2))
    assert events == whole == [e for e, _ in GOLDEN_CLIENT] * 3


# -- validation and order ----------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: Request(-1, "m"),
        lambda: Request(MAX_ID + 1, "m"),
        lambda: Request(True, "m"),
        lambda: Request(1, ""),
        lambda: Request(1, "x" * 65),
        lambda: Request(1, b"m"),
        lambda: Error(1, "", "m"),
        lambda: Error(1, "c", "x" * 5000),
        lambda: Challenge(b"short", "s"),
        lambda: Challenge(NONCE, ""),
        lambda: Auth(b"x" * 31),
    ],
)
def test_events_validate_their_fields(make):
    with pytest.raises(LocalProtocolError):
        make()


def test_send_order_is_enforced():
    server, client = RpcConnection(SERVER), RpcConnection(CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(Request(1, "m"))  # before the challenge
    with pytest.raises(LocalProtocolError):
        server.send(Response(1, None))  # before the challenge
    server.send(Error(0, "busy"))  # refusing is always allowed
    server, client = pair()
    with pytest.raises(LocalProtocolError):
        client.send(Auth(b""))  # twice
    with pytest.raises(LocalProtocolError):
        client.send(Request(0, "m"))  # id 0 is reserved


def test_unencodable_and_oversized_values_are_local_errors():
    server, client = pair(max_frame=256)
    with pytest.raises(LocalProtocolError):
        client.send(Request(1, "m", object()))
    with pytest.raises(LocalProtocolError) as info:
        client.send(Request(1, "m", b"x" * 300))
    assert info.value.reason == "frame_too_large"
    client.send(Request(1, "m", b"x" * 10))  # the connection is still usable


def test_request_before_auth_is_unexpected():
    server = RpcConnection(SERVER)
    server.send(Challenge(NONCE, "s"))
    server.receive_data(frame(b"\x95\x01\x00\x01\xa4ping\xc0"))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.reason == "unexpected"
    with pytest.raises(RemoteProtocolError):  # and stays dead
        server.next_event()


@pytest.mark.parametrize(
    "obj,reason",
    [
        ([2, 0, 1, "m", None], "bad_version"),
        (["1", 0, 1, "m", None], "bad_version"),
        ([1, 9, 1], "bad_kind"),
        ([1, 0, 1, "m"], "bad_fields"),
        ([1, 0, -1, "m", None], "bad_fields"),
        ([1, 0, 1, "", None], "bad_fields"),
        ({"v": 1}, "bad_fields"),
        ([1, 0], "bad_fields"),
    ],
)
def test_bad_frames_have_reasons(obj, reason):
    server, _ = pair()
    server.receive_data(frame(msgpack.packb(obj)))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.reason == reason
    assert reason in REASONS


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", b"\x95\x01\x00\x01\xa4ping", b"\x95\x01\x00\x01\xa1m\xc0\xc0", b"\x95\x01\x00\x01\xa1m\xd4\x05\x00",
     b"\x95\x01\x00\x01\xa1m\xd6\xff\x00\x00\x00\x01", b"\x95\x01\x00\x01\xa1m\x81\x91\x01\x02"],
)
def test_undecodable_bodies_are_bad_msgpack(body):
    server, _ = pair()
    server.receive_data(frame(body))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.reason == "bad_msgpack"


def test_oversize_length_prefix_is_rejected_from_the_header_alone():
    server, _ = pair(max_frame=1024)
    server.receive_data((1025).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.reason == "frame_too_large"
    assert server.buffered == 0


def test_a_frame_of_exactly_max_frame_is_accepted():
    server, client = pair(max_frame=300)
    params = b"x" * 300
    while True:  # shrink until the whole body is exactly 300 bytes
        body_len = len(msgpack.packb([1, 0, 1, "m", params]))
        if body_len == 300:
            break
        params = params[: len(params) - (body_len - 300)]
    server.receive_data(client.send(Request(1, "m", params)))
    assert server.next_event() == Request(1, "m", params)


def test_eof_between_frames_and_mid_frame():
    server, client = pair()
    server.receive_data(client.send(Request(1, "m")))
    server.receive_data(b"")
    assert server.next_event() == Request(1, "m")
    assert isinstance(server.next_event(), ConnectionClosed)
    server, client = pair()
    server.receive_data(client.send(Request(1, "m"))[:-1])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.reason == "truncated"
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")


def test_mac():
    mac = compute_mac(TOKEN, NONCE, "srv")
    assert len(mac) == 32
    assert verify_mac(TOKEN, NONCE, "srv", mac)
    assert not verify_mac(TOKEN, NONCE, "other", mac)  # bound to the server name
    assert not verify_mac(TOKEN, bytes(32), "srv", mac)
    assert not verify_mac(b"u" * 32, NONCE, "srv", mac)
    assert not verify_mac(TOKEN, NONCE, "srv", b"")
    assert verify_mac(None, NONCE, "srv", b"")
    assert not verify_mac(None, NONCE, "srv", mac)


# -- properties -------------------------------------------------------------------

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=5) | st.integers(-(2**63), 2**64 - 1), children, max_size=5),
    max_leaves=20,
)
ids = st.integers(min_value=1, max_value=MAX_ID)
methods = st.text(min_size=1, max_size=64)


@given(st.lists(st.tuples(ids, methods, values), max_size=5), st.data())
def test_requests_round_trip_in_any_chunking(requests, data):
    server, client = pair()
    events = [Request(i, m, p) for i, m, p in requests]
    wire = b"".join(client.send(e) for e in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        server.receive_data(wire[a:b]) if b > a else None
        got.extend(drain(server))
    assert got == events


@given(ids, values, st.text(min_size=1, max_size=64), st.text(max_size=100))
def test_responses_and_errors_round_trip(i, result, code, message):
    server, client = pair()
    events = [Response(i, result), Error(i, code, message)]
    client.receive_data(b"".join(server.send(e) for e in events))
    assert drain(client) == events


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_parse_or_raise_remote_error(data):
    server, _ = pair(max_frame=512)
    _fuzz(server, data)
    client = RpcConnection(CLIENT, max_frame=512)
    _fuzz(client, data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(ids, methods, values), min_size=1, max_size=3), st.data())
def test_fuzz_mutated_frames_parse_or_raise_remote_error(requests, data):
    _, client = pair()
    wire = bytearray(b"".join(client.send(Request(i, m, p)) for i, m, p in requests))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    server, _ = pair()
    _fuzz(server, bytes(wire))


def _fuzz(conn: RpcConnection, data: bytes) -> None:
    try:
        conn.receive_data(data)
        conn.receive_data(b"")
        for _ in range(len(data) + 2):
            ev = conn.next_event()
            assert ev is not NEED_DATA  # after EOF, never
            assert isinstance(ev, (Request, Response, Error, Challenge, Auth, ConnectionClosed))
            if isinstance(ev, ConnectionClosed):
                return
    except RemoteProtocolError as exc:
        assert exc.reason in REASONS
