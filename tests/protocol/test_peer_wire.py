"""Tests for shoal.protocol.peer_wire (BEP 3 peer wire, BEP 6, BEP 9, BEP 10, BEP 11)."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol import peer_wire as pw
from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError
from shoal.protocol.peer_wire import (
    NEED_DATA,
    RESERVED,
    AllowedFast,
    Bitfield,
    Cancel,
    Choke,
    ConnectionClosed,
    Extended,
    ExtHandshake,
    Handshake,
    Have,
    HaveAll,
    HaveNone,
    Interested,
    KeepAlive,
    MetadataData,
    MetadataReject,
    MetadataRequest,
    NotInterested,
    PeerConnection,
    Pex,
    Piece,
    Port,
    RejectRequest,
    Request,
    SuggestPiece,
    Unchoke,
    decode_ext_handshake,
    decode_metadata,
    decode_pex,
    encode_ext_handshake,
    encode_message,
    encode_metadata,
    encode_pex,
)

from .fuzz import checkers, mutated

FAST = settings(max_examples=300, deadline=None)
# Examples that draw many IP addresses are slow to generate: fewer of them.
HEAVY = settings(max_examples=60, deadline=None)

IH = bytes(range(1, 21))
PID = b"-SH0100-abcdefghijkl"
THEIR_PID = b"-LT2110-mnopqrstuvwx"
H = bytes.fromhex

parses_or_remote, reason_of = checkers(pw.REASONS)


def fails(fn) -> str:
    """The reason of the RemoteProtocolError that ``fn()`` raises."""
    return reason_of(lambda _: fn(), None)

# -- helpers -----------------------------------------------------------------------


def their_handshake(reserved: bytes = RESERVED, info_hash: bytes = IH) -> bytes:
    return b"\x13BitTorrent protocol" + reserved + info_hash + THEIR_PID


def established(*, reserved: bytes = RESERVED, ours: bytes = RESERVED, **kw) -> PeerConnection:
    """A connection past both handshakes (we initiated)."""
    conn = PeerConnection(**kw)
    conn.send(Handshake(IH, PID, ours))
    conn.receive_data(their_handshake(reserved))
    assert conn.next_event() == Handshake(IH, THEIR_PID, reserved)
    return conn


def drain(conn: PeerConnection) -> list:
    events = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)
        if type(ev) is ConnectionClosed:
            return events


def decode_stream(data: bytes, *, eof: bool = True, **kw) -> list:
    """Events of ``data`` received after the handshakes (the fuzz target)."""
    conn = established(**kw)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    return drain(conn)


def decode_one(raw: bytes, **kw):
    events = decode_stream(raw, **kw)
    assert events[-1] == ConnectionClosed() and len(events) == 2, events
    return events[0]


# -- golden bytes ------------------------------------------------------------------

HANDSHAKE = (
    b"\x13" + b"BitTorrent protocol"
    + H("0000000000100004")  # reserved: extension protocol (byte 5), fast (byte 7)
    + IH
    + PID
)

GOLDEN = [
    (KeepAlive(), H("00000000")),
    (Choke(), H("00000001" "00")),
    (Unchoke(), H("00000001" "01")),
    (Interested(), H("00000001" "02")),
    (NotInterested(), H("00000001" "03")),
    (Have(5), H("00000005" "04" "00000005")),
    (Bitfield(H("ff80")), H("00000003" "05" "ff80")),
    (Request(1, 0x4000, 0x4000), H("0000000d" "06" "00000001" "00004000" "00004000")),
    (Piece(1, 0x4000, b"abc"), H("0000000c" "07" "00000001" "00004000") + b"abc"),
    (Cancel(1, 0x4000, 0x4000), H("0000000d" "08" "00000001" "00004000" "00004000")),
    (Port(6881), H("00000003" "09" "1ae1")),
    (SuggestPiece(7), H("00000005" "0d" "00000007")),
    (HaveAll(), H("00000001" "0e")),
    (HaveNone(), H("00000001" "0f")),
    (RejectRequest(2, 0, 0x4000), H("0000000d" "10" "00000002" "00000000" "00004000")),
    (AllowedFast(3), H("00000005" "11" "00000003")),
    (Extended(0, b"d1:md11:ut_metadatai3eee"),
     H("0000001a" "14" "00") + b"d1:md11:ut_metadatai3eee"),
    (Extended(3, b""), H("00000002" "14" "03")),
]


def test_golden_handshake():
    h = Handshake(IH, PID)
    assert h.reserved == RESERVED == H("0000000000100004")
    assert h.fast and h.extensions and not h.dht
    assert len(HANDSHAKE) == pw.HANDSHAKE_LENGTH == 68
    conn = PeerConnection()
    assert conn.send(h) == HANDSHAKE
    receiver = PeerConnection()
    receiver.receive_data(HANDSHAKE)
    assert receiver.next_event() == h
    assert receiver.next_event() is NEED_DATA


def test_reserved_bits():
    assert pw.reserved_bytes() == bytes(8)
    assert pw.reserved_bytes(fast=True) == H("0000000000000004")
    assert pw.reserved_bytes(extensions=True) == H("0000000000100000")
    assert pw.reserved_bytes(dht=True) == H("0000000000000001")
    plain = Handshake.with_flags(IH, PID, fast=False, extensions=False)
    assert not plain.fast and not plain.extensions and plain.reserved == bytes(8)
    assert Handshake.with_flags(IH, PID) == Handshake(IH, PID)


@pytest.mark.parametrize("event,raw", GOLDEN, ids=[type(e).__name__ for e, _ in GOLDEN])
def test_golden_messages(event, raw):
    assert encode_message(event) == raw
    assert decode_one(raw, num_pieces=9) == event
    conn = established(num_pieces=9)
    assert conn.send(event) == raw


def test_all_golden_messages_in_one_stream_and_byte_at_a_time():
    # The piece state normally comes first: the Bitfield leads.
    msgs = [(e, r) for e, r in GOLDEN if type(e) is Bitfield]
    msgs += [(e, r) for e, r in GOLDEN if type(e) not in (Bitfield, HaveAll, HaveNone)]
    stream = b"".join(r for _, r in msgs)
    whole = decode_stream(stream, num_pieces=9)
    assert whole == [e for e, _ in msgs] + [ConnectionClosed()]

    conn = PeerConnection(num_pieces=9)
    conn.send(Handshake(IH, PID))
    events = []
    for b in their_handshake() + stream:
        conn.receive_data(bytes([b]))
        events += drain(conn)
    conn.receive_data(b"")
    events += drain(conn)
    assert events == [Handshake(IH, THEIR_PID)] + whole


@FAST
@given(st.data())
def test_any_split_gives_the_same_events(data):
    msgs = [r for e, r in GOLDEN if type(e) not in (Bitfield, HaveAll, HaveNone)]
    states = [r for e, r in GOLDEN if type(e) in (Bitfield, HaveAll, HaveNone)]
    state = data.draw(st.sampled_from(states))
    stream = their_handshake() + state + b"".join(data.draw(st.permutations(msgs)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    conn = PeerConnection(num_pieces=9)
    conn.send(Handshake(IH, PID))
    events = []
    for a, b in zip([0] + cuts, cuts + [len(stream)], strict=True):
        if a < b:  # b"" would mean end of file
            conn.receive_data(stream[a:b])
            events += drain(conn)
    one = PeerConnection(num_pieces=9)
    one.send(Handshake(IH, PID))
    one.receive_data(stream)
    assert events == drain(one)


# -- the handshake ------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        b"\x8e",  # what an MSE (encrypted) handshake starts with: a random DH key
        b"\x00",
        b"\x14",
        b"GET / HTTP/1.1\r\n",
        b"\x13BitTorrent Protocol",  # wrong case, caught at byte 13
        b"\x13BitTorrent protocoL",  # caught at the 20th byte
        b"\x13BitTorrent protocol"[:19] + b"X" + bytes(48),
    ],
)
def test_bad_handshake_fails_on_the_first_wrong_byte(first):
    conn = PeerConnection()
    conn.receive_data(first)
    assert fails(conn.next_event) == "bad_handshake"
    # ...and stays failed.
    assert fails(conn.next_event) == "bad_handshake"


def test_mse_first_byte_fails_before_68_bytes():
    conn = PeerConnection()
    conn.receive_data(b"\x8e")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == "bad_handshake"


def test_every_prefix_of_a_handshake_needs_data():
    for i in range(1, len(HANDSHAKE)):
        conn = PeerConnection()
        conn.receive_data(HANDSHAKE[:i])
        assert conn.next_event() is NEED_DATA
        assert conn.their_handshake is None


def test_every_prefix_then_eof():
    conn = PeerConnection()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    for i in range(1, len(HANDSHAKE)):
        conn = PeerConnection()
        conn.receive_data(HANDSHAKE[:i])
        conn.receive_data(b"")
        assert fails(conn.next_event) == "truncated"


def test_initiator_checks_the_answering_info_hash():
    conn = PeerConnection()
    conn.send(Handshake(IH, PID))
    conn.receive_data(their_handshake(info_hash=b"\xff" * 20))
    assert fails(conn.next_event) == "wrong_info_hash"


def test_receiver_answers_with_their_info_hash():
    conn = PeerConnection()
    conn.receive_data(their_handshake())
    assert conn.next_event().info_hash == IH
    assert conn.our_handshake is None and not conn.fast
    with pytest.raises(LocalProtocolError):
        conn.send(Handshake(b"\xff" * 20, PID))
    conn.send(Handshake(IH, PID))
    assert conn.fast and conn.extensions
    with pytest.raises(LocalProtocolError):
        conn.send(Handshake(IH, PID))  # only once


def test_messages_pipelined_behind_the_handshake():
    conn = PeerConnection(num_pieces=8)
    conn.send(Handshake(IH, PID))
    conn.receive_data(their_handshake() + H("00000002" "05" "ff") + H("00000001" "01"))
    assert drain(conn) == [Handshake(IH, THEIR_PID), Bitfield(b"\xff"), Unchoke()]


@pytest.mark.parametrize(
    "ours,theirs,fast_param,fast,ext",
    [
        (RESERVED, RESERVED, True, True, True),
        (RESERVED, RESERVED, False, False, True),
        (RESERVED, bytes(8), True, False, False),
        (bytes(8), RESERVED, True, False, False),
        (pw.reserved_bytes(fast=True), RESERVED, True, True, False),
        (RESERVED, pw.reserved_bytes(extensions=True), True, False, True),
    ],
)
def test_negotiation(ours, theirs, fast_param, fast, ext):
    conn = established(ours=ours, reserved=theirs, fast=fast_param)
    assert (conn.fast, conn.extensions) == (fast, ext)


# -- framing limits ------------------------------------------------------------------


def test_oversize_length_prefix_is_rejected_after_four_bytes():
    conn = established()
    conn.receive_data((pw.DEFAULT_MAX_MESSAGE + 1).to_bytes(4, "big"))
    assert fails(conn.next_event) == "too_long"
    conn = established()
    conn.receive_data(H("ffffffff"))
    assert fails(conn.next_event) == "too_long"
    # A length at the bound waits for its body.
    conn = established()
    conn.receive_data(pw.DEFAULT_MAX_MESSAGE.to_bytes(4, "big") + b"\x05")
    assert conn.next_event() is NEED_DATA


def test_max_message_covers_the_largest_bitfield():
    n = pw.MAX_PIECES
    assert 1 + n // 8 == pw.DEFAULT_MAX_MESSAGE
    conn = established(num_pieces=n)
    conn.receive_data(encode_message(Bitfield.full(n)))
    assert drain(conn) == [Bitfield.full(n)]


def test_custom_max_message():
    conn = established(max_block=64, max_message=100)
    conn.receive_data(encode_message(Extended(5, b"x" * 98)))
    assert drain(conn) == [Extended(5, b"x" * 98)]
    conn.receive_data(encode_message(Extended(5, b"x" * 99)))
    assert fails(conn.next_event) == "too_long"
    with pytest.raises(LocalProtocolError):
        PeerConnection(max_message=100)  # a 16 KiB block would not fit
    with pytest.raises(LocalProtocolError):
        PeerConnection(max_block=0)


@pytest.mark.parametrize(
    "raw",
    [
        H("00000002" "00" "00"),  # choke with a payload
        H("00000002" "0e" "00"),  # have_all with a payload
        H("00000004" "04" "000000"),  # short have
        H("00000006" "04" "0000000000"),  # long have
        H("0000000c" "06" "0000000000000000000040"),
        H("0000000e" "06" "000000000000000000004000" "00"),
        H("0000000c" "08" "0000000000000000000040"),
        H("0000000c" "10" "0000000000000000000040"),
        H("00000002" "09" "1a"),
        H("00000004" "09" "1ae100"),
        H("00000004" "11" "000000"),
        H("00000006" "0d" "0000000000"),
        H("00000001" "14"),  # extended without ext_id
        H("00000009" "07" "0000000000000000"),  # piece with an empty block
        H("0000000d" "06" "00000000" "00000000" "00000000"),  # request of 0 bytes
        H("0000000d" "06" "00000000" "00000000" "00004001"),  # request above max_block
        H("0000000d" "08" "00000000" "00000000" "00000000"),  # cancel of 0 bytes
        H("0000000d" "10" "00000000" "00000000" "00010000"),  # reject above max_block
    ],
)
def test_bad_length(raw):
    assert reason_of(decode_stream, raw) == "bad_length"


def test_oversize_piece_rejected_from_its_header():
    conn = established()
    conn.receive_data((9 + pw.MAX_BLOCK + 1).to_bytes(4, "big") + b"\x07")
    assert fails(conn.next_event) == "bad_length"
    conn = established()
    conn.receive_data((9 + pw.MAX_BLOCK).to_bytes(4, "big") + b"\x07")
    assert conn.next_event() is NEED_DATA


def test_max_block_is_configurable():
    raw = encode_message(Piece(0, 0, b"x" * 32768))
    assert reason_of(decode_stream, raw) == "bad_length"
    assert decode_one(raw, max_block=32768) == Piece(0, 0, b"x" * 32768)
    req = encode_message(Request(0, 0, 32768))
    assert decode_one(req, max_block=32768) == Request(0, 0, 32768)


def test_unknown_ids_are_skipped():
    unknown = H("00000004" "15" "abcdef") + H("00000001" "ff") + H("00000001" "0a")
    conn = established()
    conn.receive_data(unknown + H("00000001" "01"))
    assert drain(conn) == [Unchoke()]
    assert conn.ignored_messages == 3
    # Byte at a time, the skipped payload is buffered and dropped.
    conn = established()
    for b in unknown + H("00000001" "02"):
        conn.receive_data(bytes([b]))
        events = drain(conn)
    assert events == [Interested()] and conn.ignored_messages == 3


def test_many_unknown_messages_in_one_chunk():
    conn = established()
    conn.receive_data(H("00000001" "63") * 50_000 + H("00000001" "00"))
    assert drain(conn) == [Choke()]
    assert conn.ignored_messages == 50_000


def test_unknown_id_over_max_message():
    conn = established(max_block=64, max_message=1000)
    conn.receive_data((1001).to_bytes(4, "big") + b"\x63")
    assert fails(conn.next_event) == "too_long"


# -- pieces and bitfields ------------------------------------------------------------


@pytest.mark.parametrize(
    "n,bits,ok",
    [
        (8, "ff", True),
        (9, "ff80", True),
        (9, "0000", True),
        (9, "ffc0", False),  # spare bit 10 set
        (9, "ff81", False),  # last spare bit set
        (9, "ff", False),  # one byte short
        (9, "ff8000", False),  # one byte long
        (16, "ffff", True),
        (1, "80", True),
        (1, "40", False),
        (1, "", False),
    ],
)
def test_bitfield_size_and_spare_bits(n, bits, ok):
    raw = encode_message(Bitfield(H(bits)))
    if ok:
        assert decode_one(raw, num_pieces=n) == Bitfield(H(bits))
    else:
        assert reason_of(decode_stream, raw, num_pieces=n) == "bad_bitfield"


def test_bitfield_checked_when_num_pieces_arrives():
    # A magnet download: the bitfield comes before the metadata.
    conn = established()
    conn.receive_data(encode_message(Bitfield(H("ffc0"))))
    assert drain(conn) == [Bitfield(H("ffc0"))]
    with pytest.raises(RemoteProtocolError) as info:
        conn.set_num_pieces(9)
    assert info.value.reason == "bad_bitfield"
    assert fails(conn.next_event) == "bad_bitfield"

    conn = established()
    conn.receive_data(encode_message(Bitfield(H("ffc0"))))
    drain(conn)
    conn.set_num_pieces(10)
    assert conn.num_pieces == 10
    conn.receive_data(encode_message(Have(10)))
    assert fails(conn.next_event) == "bad_index"

    conn = established()
    conn.receive_data(encode_message(Bitfield(H("ff"))))
    drain(conn)
    with pytest.raises(RemoteProtocolError):
        conn.set_num_pieces(9)  # 2 bytes needed


def test_indices_checked_when_num_pieces_arrives():
    conn = established()
    conn.receive_data(encode_message(Have(99)) + encode_message(AllowedFast(3)))
    assert drain(conn) == [Have(99), AllowedFast(3)]
    with pytest.raises(RemoteProtocolError) as info:
        conn.set_num_pieces(99)
    assert info.value.reason == "bad_index"
    conn = established()
    conn.receive_data(encode_message(Have(99)))
    drain(conn)
    conn.set_num_pieces(100)
    conn.set_num_pieces(100)  # idempotent
    with pytest.raises(LocalProtocolError):
        conn.set_num_pieces(101)


@pytest.mark.parametrize(
    "event",
    [Have(9), Request(9, 0, 1), Piece(9, 0, b"x"), Cancel(9, 0, 1), SuggestPiece(9),
     RejectRequest(9, 0, 1), AllowedFast(9), Have(2**32 - 1)],
)
def test_bad_index(event):
    assert reason_of(decode_stream, encode_message(event), num_pieces=9) == "bad_index"
    assert decode_one(encode_message(event)) == event  # fine while num_pieces is unknown


@pytest.mark.parametrize(
    "first,second",
    [
        (Bitfield(b"\xff"), Bitfield(b"\xff")),
        (Bitfield(b"\xff"), HaveAll()),
        (HaveAll(), HaveNone()),
        (HaveNone(), Bitfield(b"\x00")),
        (Have(1), Bitfield(b"\xff")),
        (Have(1), HaveNone()),
    ],
)
def test_a_later_piece_state_is_accepted_as_a_replacement(first, second):
    # aria2 sends HaveNone and later a second piece-state message; refusing it
    # cut aria2 off from shoal seeders. The later message replaces the state.
    raw = encode_message(first) + encode_message(second)
    assert decode_stream(raw, num_pieces=8)[:2] == [first, second]


def test_a_later_bitfield_is_still_checked():
    raw = encode_message(HaveNone()) + encode_message(Bitfield(b"\xff\x80"))
    assert reason_of(decode_stream, raw, num_pieces=8) == "bad_bitfield"


def test_have_after_bitfield_is_fine():
    raw = encode_message(HaveNone()) + encode_message(Have(1)) + encode_message(Have(2))
    assert decode_stream(raw, num_pieces=8)[:3] == [HaveNone(), Have(1), Have(2)]


def test_bitfield_helpers():
    b = Bitfield.from_indices(10, [0, 3, 9])
    assert b.bits == H("9040")
    assert [i for i in range(12) if b.has(i)] == [0, 3, 9]
    assert Bitfield.full(9).bits == H("ff80")
    with pytest.raises(LocalProtocolError):
        Bitfield.from_indices(9, [9])


# -- negotiation-dependent messages ------------------------------------------------------

FAST_MESSAGES = [SuggestPiece(1), HaveAll(), HaveNone(), RejectRequest(1, 0, 16384), AllowedFast(1)]


@pytest.mark.parametrize("event", FAST_MESSAGES, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize(
    "kw",
    [{"reserved": pw.reserved_bytes(extensions=True)}, {"ours": pw.reserved_bytes(extensions=True)},
     {"fast": False}],
    ids=["they-lack-fast", "we-lack-fast", "fast=False"],
)
def test_fast_messages_need_negotiation(event, kw):
    raw = encode_message(event)
    assert reason_of(decode_stream, raw[:5], eof=False, **kw) == "unexpected"  # from the header
    conn = established(**kw)
    with pytest.raises(LocalProtocolError):
        conn.send(event)


def test_extended_needs_negotiation():
    kw = {"reserved": pw.reserved_bytes(fast=True)}
    assert reason_of(decode_stream, encode_message(Extended(0, b"de")), **kw) == "unexpected"
    with pytest.raises(LocalProtocolError):
        established(**kw).send(Extended(0, b"de"))


def test_fast_messages_before_their_handshake_cannot_be_sent():
    conn = PeerConnection()
    conn.send(Handshake(IH, PID))
    with pytest.raises(LocalProtocolError):
        conn.send(HaveNone())  # negotiation unknown until their handshake arrives
    assert conn.send(Interested()) == H("00000001" "02")


# -- end of file and errors ---------------------------------------------------------------


def test_eof_on_a_boundary_and_inside_a_message():
    raw = encode_message(Request(1, 2, 3))
    assert decode_stream(raw) == [Request(1, 2, 3), ConnectionClosed()]
    assert decode_stream(b"") == [ConnectionClosed()]
    for i in range(1, len(raw)):
        assert reason_of(decode_stream, raw[:i]) == "truncated"
    piece = encode_message(Piece(0, 0, b"x" * 16384))
    assert reason_of(decode_stream, piece[:-1]) == "truncated"
    assert reason_of(decode_stream, H("00000004" "63" "00")) == "truncated"  # unknown id too


def test_connection_closed_repeats_and_data_after_eof_is_a_local_error():
    conn = established()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.next_event() == ConnectionClosed()
    assert conn.closed
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


def test_errors_are_sticky():
    conn = established(num_pieces=4)
    conn.receive_data(encode_message(Have(4)) + encode_message(Choke()))
    assert fails(conn.next_event) == "bad_index"
    assert fails(conn.next_event) == "bad_index"


# -- state tracking and local errors ----------------------------------------------------------


def test_choke_and_interest_flags():
    conn = established()
    assert (conn.am_choking, conn.am_interested, conn.peer_choking, conn.peer_interested) == (
        True, False, True, False)
    conn.send(Unchoke())
    conn.send(Interested())
    conn.receive_data(encode_message(Unchoke()) + encode_message(Interested()))
    drain(conn)
    assert (conn.am_choking, conn.am_interested, conn.peer_choking, conn.peer_interested) == (
        False, True, False, True)
    conn.send(Choke())
    conn.send(NotInterested())
    conn.receive_data(encode_message(Choke()) + encode_message(NotInterested()))
    drain(conn)
    assert (conn.am_choking, conn.am_interested, conn.peer_choking, conn.peer_interested) == (
        True, False, True, False)


def test_local_errors():
    with pytest.raises(LocalProtocolError):
        PeerConnection().send(Interested())  # before our handshake
    with pytest.raises(LocalProtocolError):
        Handshake(IH[:19], PID)
    with pytest.raises(LocalProtocolError):
        Handshake(IH, PID, b"\x00" * 7)
    with pytest.raises(LocalProtocolError):
        Have(-1)
    with pytest.raises(LocalProtocolError):
        Have(True)
    with pytest.raises(LocalProtocolError):
        Request(0, 2**32, 1)
    with pytest.raises(LocalProtocolError):
        Piece(0, 0, bytearray(b"x"))
    with pytest.raises(LocalProtocolError):
        Port(65536)
    with pytest.raises(LocalProtocolError):
        Extended(256, b"")
    with pytest.raises(LocalProtocolError):
        encode_message(Handshake(IH, PID))
    with pytest.raises(LocalProtocolError):
        PeerConnection(num_pieces=0)
    conn = established(num_pieces=9)
    for bad in (Have(9), Request(0, 0, 0), Request(0, 0, 16385), Piece(0, 0, b""),
                Piece(0, 0, b"x" * 16385), Bitfield(b"\xff"), Bitfield(H("ffc0"))):
        with pytest.raises(LocalProtocolError):
            conn.send(bad)
    conn.send(Bitfield(H("ff80")))
    with pytest.raises(LocalProtocolError):
        conn.send(HaveAll())  # piece state already sent
    with pytest.raises(LocalProtocolError):
        established().send(Bitfield(b"\xff"))  # num_pieces unknown


# -- round trips -------------------------------------------------------------------------

U32 = st.integers(0, 2**32 - 1)
LEN = st.integers(1, pw.MAX_BLOCK)

plain_messages = st.one_of(
    st.just(KeepAlive()), st.just(Choke()), st.just(Unchoke()), st.just(Interested()),
    st.just(NotInterested()),
    st.builds(Have, U32),
    st.builds(Request, U32, U32, LEN),
    st.builds(Piece, U32, U32, st.binary(min_size=1, max_size=300)),
    st.builds(Cancel, U32, U32, LEN),
    st.builds(Port, st.integers(0, 65535)),
    st.builds(SuggestPiece, U32),
    st.builds(RejectRequest, U32, U32, LEN),
    st.builds(AllowedFast, U32),
    st.builds(Extended, st.integers(0, 255), st.binary(max_size=300)),
)
state_messages = st.one_of(st.builds(Bitfield, st.binary(max_size=100)), st.just(HaveAll()),
                           st.just(HaveNone()))


@FAST
@given(st.one_of(plain_messages, state_messages))
def test_message_roundtrip(event):
    assert decode_one(encode_message(event)) == event


@FAST
@given(st.lists(plain_messages, max_size=30), st.none() | state_messages)
def test_sequence_roundtrip(events, first):
    events = ([first] if first is not None else []) + events
    # Haves are only allowed after the piece state, which comes first here.
    raw = b"".join(encode_message(e) for e in events)
    assert decode_stream(raw) == events + [ConnectionClosed()]


@FAST
@given(st.integers(1, 2000), st.data())
def test_bitfield_roundtrip_with_num_pieces(n, data):
    have = data.draw(st.sets(st.integers(0, n - 1)))
    b = Bitfield.from_indices(n, have)
    assert decode_one(encode_message(b), num_pieces=n) == b
    assert {i for i in range(n) if b.has(i)} == have


# -- fuzz invariant ----------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_after_the_handshake(data):
    parses_or_remote(decode_stream, data)
    parses_or_remote(decode_stream, data, num_pieces=7)
    parses_or_remote(decode_stream, data, reserved=bytes(8), max_block=64, max_message=100)


@FAST
@given(st.binary(max_size=100))
def test_fuzz_random_bytes_as_handshake(data):
    conn = PeerConnection()
    conn.receive_data(data)
    conn.receive_data(b"")
    parses_or_remote(lambda _: drain(conn), None)


@FAST
@given(mutated(st.lists(st.one_of(plain_messages, state_messages), max_size=8).map(
    lambda evs: b"".join(encode_message(e) for e in evs))))
def test_fuzz_mutated_streams(data):
    parses_or_remote(decode_stream, data)
    parses_or_remote(decode_stream, data, num_pieces=3)
    parses_or_remote(decode_stream, data, eof=False, num_pieces=300, fast=False)


@FAST
@given(mutated(st.just(HANDSHAKE)))
def test_fuzz_mutated_handshake(data):
    conn = PeerConnection()
    conn.send(Handshake(IH, PID))
    conn.receive_data(data)
    parses_or_remote(lambda _: drain(conn), None)


@FAST
@given(st.binary(max_size=200), st.integers(1, 100))
def test_fuzz_set_num_pieces(data, n):
    def run(data):
        conn = established()
        conn.receive_data(data)
        drain(conn)
        conn.set_num_pieces(n)
    parses_or_remote(run, data)


# -- receive path is linear ---------------------------------------------------------------------


def test_many_pieces_in_one_chunk_decode_in_linear_time():
    # 2048 blocks of 16 KiB (32 MiB) delivered in one receive_data: a decoder
    # that copied or shifted the rest of the buffer per message would move
    # ~32 GiB here and take minutes; the offset-based one takes ~20 ms.
    block = bytes(range(256)) * 64
    raw = b"".join(encode_message(Piece(i, 0, block)) for i in range(2048))
    conn = established()
    conn.receive_data(raw)
    count = 0
    while (ev := conn.next_event()) is not NEED_DATA:
        assert ev.index == count and ev.block == block
        count += 1
    assert count == 2048
    # ...and in 64 KiB reads, with compaction between them.
    conn = established()
    count = 0
    for i in range(0, len(raw), 65536):
        conn.receive_data(raw[i : i + 65536])
        count += len(drain(conn))
    assert count == 2048 and len(conn._buf) < 2 * 65536 + 16397


# -- BEP 10 extended handshake ---------------------------------------------------------------

# What libtorrent 2.1.1 sends as a seed (captured on loopback; several keys we do not use).
LT_EXT = (
    b"d12:complete_agoi-1e1:md11:lt_donthavei7e10:share_modei8e11:upload_onlyi3e"
    b"12:ut_holepunchi4e11:ut_metadatai2e6:ut_pexi1ee13:metadata_sizei108e"
    b"4:reqqi2000e11:upload_onlyi1e1:v18:libtorrent/2.1.1.06:yourip4:\x7f\x00\x00\x01e"
)


def test_ext_handshake_golden():
    h = decode_ext_handshake(LT_EXT)
    assert h.m == {"lt_donthave": 7, "share_mode": 8, "upload_only": 3, "ut_holepunch": 4,
                   "ut_metadata": 2, "ut_pex": 1}
    assert (h.metadata_size, h.p, h.reqq, h.v, h.yourip) == (
        108, None, 2000, "libtorrent/2.1.1.0", b"\x7f\x00\x00\x01")
    with_port = LT_EXT.replace(b"4:reqq", b"1:pi6881e4:reqq")
    assert decode_ext_handshake(with_port).p == 6881
    ours = ExtHandshake({"ut_metadata": 3}, v="shoal", reqq=250)
    assert encode_ext_handshake(ours) == b"d1:md11:ut_metadatai3ee4:reqqi250e1:v5:shoale"
    assert decode_ext_handshake(b"de") == ExtHandshake()


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"", "bad_bencode"),
        (b"d1:md11:ut_metadatai3ee", "bad_bencode"),  # missing the final e
        (b"d1:v1:a1:m0:e", "bad_bencode"),  # unsorted keys
        (b"li1ee", "bad_extension"),
        (b"d1:mi1ee", "bad_extension"),
        (b"d1:md11:ut_metadatai256eee", "bad_extension"),
        (b"d1:md11:ut_metadatai-1eee", "bad_extension"),
        (b"d1:md11:ut_metadata1:xee", "bad_extension"),
        (b"d1:md1:\xffi1eee", "bad_extension"),
        (b"d1:pi65536ee", "bad_extension"),
        (b"d1:v3:abce", None),
        (b"d1:vi1ee", "bad_extension"),
        (b"d6:yourip3:abce", "bad_extension"),
        (b"d13:metadata_sizei-1ee", "bad_extension"),
        (b"d13:metadata_sizei99999999999ee", "bad_extension"),
        (b"d4:reqq1:xe", "bad_extension"),
    ],
)
def test_ext_handshake_rejections(payload, reason):
    if reason is None:
        decode_ext_handshake(payload)
    else:
        assert reason_of(decode_ext_handshake, payload) == reason


names = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)
ext_handshakes = st.builds(
    ExtHandshake,
    st.dictionaries(names, st.integers(0, 255), max_size=6),
    st.none() | st.integers(0, pw.MAX_METADATA_SIZE),
    st.none() | st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
    st.none() | st.integers(0, 2**31 - 1),
    st.none() | st.integers(0, 65535),
    st.none() | st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16),
)


@FAST
@given(ext_handshakes)
def test_ext_handshake_roundtrip(h):
    assert decode_ext_handshake(encode_ext_handshake(h)) == h


# -- BEP 9 ut_metadata ---------------------------------------------------------------------------


def test_metadata_golden():
    assert encode_metadata(MetadataRequest(0)) == b"d8:msg_typei0e5:piecei0ee"
    assert encode_metadata(MetadataReject(1)) == b"d8:msg_typei2e5:piecei1ee"
    raw = b"d8:msg_typei1e5:piecei0e10:total_sizei3ee" + b"abc"
    assert encode_metadata(MetadataData(0, 3, b"abc")) == raw
    assert decode_metadata(raw) == MetadataData(0, 3, b"abc")
    assert decode_metadata(b"d8:msg_typei0e5:piecei0ee") == MetadataRequest(0)
    assert decode_metadata(b"d8:msg_typei2e5:piecei1ee") == MetadataReject(1)
    # Extra keys are ignored (some clients send total_size in requests).
    assert decode_metadata(b"d8:msg_typei0e5:piecei0e10:total_sizei3ee") == MetadataRequest(0)
    # Unknown msg_type: BEP 9 says ignore the message.
    assert decode_metadata(b"d8:msg_typei7e5:piecei0ee") is None


def test_metadata_piece_sizes():
    total = 2 * pw.METADATA_PIECE + 5
    assert decode_metadata(encode_metadata(MetadataData(1, total, b"x" * 16384))).piece == 1
    assert decode_metadata(encode_metadata(MetadataData(2, total, b"x" * 5))).data == b"x" * 5
    with pytest.raises(LocalProtocolError):
        MetadataData(3, total, b"")  # past the end
    with pytest.raises(LocalProtocolError):
        MetadataData(0, total, b"x" * 5)  # a full piece is 16 KiB


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"d8:msg_typei1e5:piecei0e10:total_sizei3ee" + b"ab", "bad_metadata"),
        (b"d8:msg_typei1e5:piecei0e10:total_sizei3ee" + b"abcd", "bad_metadata"),
        (b"d8:msg_typei1e5:piecei1e10:total_sizei3ee", "bad_metadata"),  # past the end
        (b"d8:msg_typei1e5:piecei0ee" + b"abc", "bad_metadata"),  # no total_size
        (b"d8:msg_typei1e5:piecei0e10:total_sizei0ee", "bad_metadata"),
        (b"d8:msg_typei0e5:piecei0ee" + b"x", "bad_metadata"),  # trailing bytes
        (b"d8:msg_typei0ee", "bad_metadata"),  # no piece
        (b"d8:msg_typei0e5:piecei-1ee", "bad_metadata"),
        (b"d5:piecei0ee", "bad_metadata"),
        (b"d8:msg_type1:0e", "bad_metadata"),
        (b"i1e", "bad_metadata"),
        (b"d8:msg_typei0e5:piecei0e", "bad_bencode"),
        (b"", "bad_bencode"),
    ],
)
def test_metadata_rejections(payload, reason):
    assert reason_of(decode_metadata, payload) == reason


@st.composite
def metadata_messages(draw):
    kind = draw(st.sampled_from(["request", "data", "reject"]))
    if kind == "data":
        total = draw(st.integers(1, 3 * pw.METADATA_PIECE))
        piece = draw(st.integers(0, (total - 1) // pw.METADATA_PIECE))
        size = min(pw.METADATA_PIECE, total - piece * pw.METADATA_PIECE)
        return MetadataData(piece, total, draw(st.binary(min_size=size, max_size=size)))
    piece = draw(st.integers(0, pw.MAX_METADATA_SIZE // pw.METADATA_PIECE - 1))
    return MetadataRequest(piece) if kind == "request" else MetadataReject(piece)


@HEAVY
@given(metadata_messages())
def test_metadata_roundtrip(msg):
    assert decode_metadata(encode_metadata(msg)) == msg


# -- BEP 11 ut_pex ---------------------------------------------------------------------------------


def test_pex_golden():
    pex = Pex(added=(("10.0.0.1", 6881),), added_flags=b"\x12", dropped=(("192.168.1.2", 6882),),
              added6=(("2001:db8::1", 51413),), added6_flags=b"\x02")
    raw = (b"d5:added6:\x0a\x00\x00\x01\x1a\xe1" b"7:added.f1:\x12"
           b"6:added618:" + H("20010db8000000000000000000000001" "c8d5") + b"8:added6.f1:\x02"
           b"7:dropped6:\xc0\xa8\x01\x02\x1a\xe2e")
    assert encode_pex(pex) == raw
    assert decode_pex(raw) == pex
    assert decode_pex(b"de") == Pex()
    # libtorrent writes every key, empty ones too.
    empty = b"d5:added0:7:added.f0:6:added60:8:added6.f0:7:dropped0:8:dropped60:e"
    assert decode_pex(empty) == Pex()
    # added.f is optional: flags default to zero.
    assert decode_pex(b"d5:added6:\x0a\x00\x00\x01\x1a\xe1e").added_flags == b"\x00"


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"d5:added5:abcdee", "bad_pex"),
        (b"d6:added617:" + bytes(17) + b"e", "bad_pex"),
        (b"d7:dropped7:" + bytes(7) + b"e", "bad_pex"),
        (b"d5:added6:" + bytes(6) + b"7:added.f2:\x00\x00e", "bad_pex"),
        (b"d5:addedi1ee", "bad_pex"),
        (b"le", "bad_pex"),
        (b"d5:added1206:" + bytes(1206) + b"e", "too_many_peers"),  # 201 peers
        (b"d8:dropped63618:" + bytes(3618) + b"e", "too_many_peers"),
        (b"d5:added", "bad_bencode"),
    ],
)
def test_pex_rejections(payload, reason):
    assert reason_of(decode_pex, payload) == reason


def test_pex_limits():
    # We accept up to MAX_PEX_PEERS per list (libtorrent sends up to 100 added)...
    raw = b"d5:added600:" + bytes(600) + b"7:added.f100:" + bytes(100) + b"e"
    assert len(decode_pex(raw).added) == 100
    # ...but send at most PEX_SEND_LIMIT added and dropped (the ut_pex convention).
    many = tuple((f"10.0.0.{i}", 1) for i in range(1, 52))
    with pytest.raises(LocalProtocolError):
        encode_pex(Pex(added=many, added_flags=bytes(51)))
    with pytest.raises(LocalProtocolError):
        encode_pex(Pex(added=many[:30], added_flags=bytes(30),
                       added6=(("::1", 1),) * 21, added6_flags=bytes(21)))
    with pytest.raises(LocalProtocolError):
        Pex(added=(("10.0.0.1", 1),))  # one flag byte per added peer
    with pytest.raises(LocalProtocolError):
        Pex(added=(("::1", 1),), added_flags=b"\x00")  # IPv6 in the IPv4 list
    with pytest.raises(LocalProtocolError):
        Pex(dropped=(("010.0.0.1", 1),))  # not normalised


def peers(v: int):
    return st.tuples(st.ip_addresses(v=v).map(str), st.integers(0, 65535))


@st.composite
def pexes(draw):
    n4 = draw(st.integers(0, 8))
    n6 = draw(st.integers(0, 8))
    return Pex(
        tuple(draw(peers(4)) for _ in range(n4)), draw(st.binary(min_size=n4, max_size=n4)),
        draw(st.lists(peers(4), max_size=8).map(tuple)),
        tuple(draw(peers(6)) for _ in range(n6)), draw(st.binary(min_size=n6, max_size=n6)),
        draw(st.lists(peers(6), max_size=8).map(tuple)),
    )


@HEAVY
@given(pexes())
def test_pex_roundtrip(pex):
    assert decode_pex(encode_pex(pex)) == pex


@FAST
@given(st.one_of(
    st.binary(max_size=200),
    mutated(ext_handshakes.map(encode_ext_handshake)),
    mutated(st.just(LT_EXT)),
    mutated(metadata_messages().map(encode_metadata)),
))
def test_fuzz_extension_payloads(data):
    parses_or_remote(decode_ext_handshake, data)
    parses_or_remote(decode_metadata, data)
    parses_or_remote(decode_pex, data)


@HEAVY
@given(mutated(pexes().map(encode_pex)))
def test_fuzz_mutated_pex(data):
    parses_or_remote(decode_pex, data)


def test_constants():
    assert len(set(pw.REASONS)) == len(pw.REASONS)
    assert pw.PROTOCOL == b"BitTorrent protocol"
    assert pw.MAX_BLOCK == 16384 and pw.METADATA_PIECE == 16384
    assert pw.DEFAULT_MAX_MESSAGE >= 9 + pw.MAX_BLOCK


# -- interop with a real client -------------------------------------------------------------------


async def _next(stream: trio.SocketStream, conn: PeerConnection, *wanted: type):
    """The next event of a type in ``wanted``, reading the socket as needed.

    Events of other types are passed over; the connection still tracks them
    (libtorrent interleaves Unchoke, AllowedFast, KeepAlive as it pleases).
    """
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif type(ev) in wanted or type(ev) is ConnectionClosed:
            return ev


@pytest.mark.interop
async def test_libtorrent_serves_blocks_to_our_connection(tmp_path):
    from shoal.demo.realclients import LibtorrentClient, make_shared_file

    piece_length = 256 * 1024
    shared = make_shared_file(tmp_path / "seed", "data.bin", 2 * piece_length,
                              "http://127.0.0.1:9/announce", piece_length=piece_length)
    data = shared.path.read_bytes()
    seeder = LibtorrentClient("127.0.0.2")
    try:
        lt = seeder.lt
        handle = seeder.add(shared.torrent, shared.path.parent, seed=True)

        def running() -> bool:
            # Auto-managed torrents start paused; a paused torrent's
            # connections are refused ("no active torrents").
            st = handle.status()
            paused = st.flags & lt.torrent_flags.paused
            return st.state == lt.torrent_status.states.seeding and not paused

        assert await trio.to_thread.run_sync(seeder.wait_until, running, 10.0)
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.2", seeder.port, local_address="127.0.0.1")
            async with stream:
                conn = PeerConnection(num_pieces=2)
                await stream.send_all(conn.send(Handshake(shared.info_hash, PID)))
                theirs = await _next(stream, conn, Handshake)
                assert type(theirs) is Handshake and theirs.info_hash == shared.info_hash
                assert conn.fast and conn.extensions

                ours = ExtHandshake({pw.UT_METADATA: 3, pw.UT_PEX: 1}, v="shoal-test", reqq=250)
                await stream.send_all(conn.send(Extended(0, encode_ext_handshake(ours)))
                                      + conn.send(HaveNone()))
                # libtorrent sends its extended handshake and its piece state
                # (HaveAll, as a fast-extension seed) in an order of its choosing.
                ext = state = None
                while ext is None or state is None:
                    ev = await _next(stream, conn, Extended, HaveAll, Bitfield, HaveNone)
                    if type(ev) is Extended:
                        assert ev.ext_id == 0
                        ext = decode_ext_handshake(ev.payload)
                    else:
                        state = ev
                assert ext.m[pw.UT_METADATA] > 0 and ext.metadata_size > 0
                assert ext.v and ext.v.startswith("libtorrent/")
                assert state in (HaveAll(), Bitfield.full(2))

                await stream.send_all(conn.send(Interested()))
                while conn.peer_choking:  # it may have unchoked us already
                    assert await _next(stream, conn, Unchoke, Choke) != ConnectionClosed()

                last = piece_length - pw.MAX_BLOCK
                await stream.send_all(conn.send(Request(0, 0, pw.MAX_BLOCK))
                                      + conn.send(Request(1, last, pw.MAX_BLOCK)))
                first = await _next(stream, conn, Piece, RejectRequest)
                second = await _next(stream, conn, Piece, RejectRequest)
                assert first == Piece(0, 0, data[: pw.MAX_BLOCK])
                end = piece_length + last
                assert second == Piece(1, last, data[end : end + pw.MAX_BLOCK])
    finally:
        seeder.close()


def test_piece_header_is_the_front_of_the_piece_message_with_the_same_checks():
    # The link sends header + block (a view of a cached piece) by scatter-gather.
    conn = established(num_pieces=9)
    block = bytes(range(256)) * 64
    assert conn.piece_header(8, 0x4000, len(block)) + block == encode_message(Piece(8, 0x4000, block))
    for index, begin, length in ((9, 0, 1), (0, 0, 0), (0, 0, 16385), (0, -1, 1), (0, 0, 1.0)):
        with pytest.raises(LocalProtocolError):
            conn.piece_header(index, begin, length)
    with pytest.raises(LocalProtocolError):
        PeerConnection(num_pieces=9).piece_header(0, 0, 1)  # before our handshake
