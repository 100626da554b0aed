"""Tests for shoal.protocol.udp_tracker (BEP 15 datagrams, BEP 41 URL data)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol import udp_tracker as udp
from shoal.protocol.errors import LocalProtocolError
from shoal.protocol.tracker import Announce, Event, Peer, ScrapeStats
from shoal.protocol.udp_tracker import (
    AnnounceRequest,
    AnnounceResponse,
    ConnectRequest,
    ConnectResponse,
    ErrorResponse,
    ScrapeRequest,
    ScrapeResponse,
    encode_request,
    encode_response,
    parse_request,
    parse_response,
)

from .fuzz import checkers, mutated

FAST = settings(max_examples=300, deadline=None)
# Tests whose examples are large recursive structures: fewer examples keep
# the suite fast while each example already covers many sub-cases.
HEAVY = settings(max_examples=150, deadline=None)

IH = bytes(range(1, 21))
PID = b"-SH0100-abcdefghijkl"
H = bytes.fromhex


parses_or_remote, reason_of = checkers(udp.REASONS)


# -- golden bytes ------------------------------------------------------------------

CONNECT_REQ = H("0000041727101980" "00000000" "12345678")
CONNECT_RESP = H("00000000" "12345678" "0123456789abcdef")

ANNOUNCE_REQ = (
    H("0123456789abcdef" "00000001" "deadbeef")
    + IH
    + PID
    + H("0000000000000001")  # downloaded
    + H("0000000000000002")  # left
    + H("0000000000000003")  # uploaded
    + H("00000002")  # event: started
    + H("00000000")  # ip: default
    + H("01020304")  # key
    + H("ffffffff")  # num_want: -1
    + H("1ae1")  # port 6881
)
ANNOUNCE = Announce(IH, PID, 6881, uploaded=3, downloaded=1, left=2, event=Event.STARTED,
                    numwant=None, key=b"\x01\x02\x03\x04")

ANNOUNCE_RESP = (
    H("00000001" "deadbeef" "00000708" "00000005" "0000000a")
    + H("0a000001" "1ae1")
    + H("c0a80102" "1ae2")
)
PEERS = (Peer("10.0.0.1", 6881), Peer("192.168.1.2", 6882))
P6 = Peer("2001:db8::1", 51413)

SCRAPE_REQ = H("0123456789abcdef" "00000002" "00000007") + IH + b"\xff" * 20
SCRAPE_RESP = H("00000002" "00000007" "00000001" "00000002" "00000003" "00000004" "00000005"
                "00000006")
ERROR_RESP = H("00000003" "00000007") + b"no such torrent"


def test_golden_connect():
    assert encode_request(ConnectRequest(0x12345678)) == CONNECT_REQ
    assert parse_request(CONNECT_REQ) == ConnectRequest(0x12345678)
    resp = ConnectResponse(0x12345678, 0x0123456789ABCDEF)
    assert encode_response(resp) == CONNECT_RESP
    assert parse_response(CONNECT_RESP) == resp


def test_golden_announce():
    req = AnnounceRequest(0x0123456789ABCDEF, 0xDEADBEEF, ANNOUNCE)
    assert len(ANNOUNCE_REQ) == 98
    assert encode_request(req) == ANNOUNCE_REQ
    assert parse_request(ANNOUNCE_REQ) == req
    resp = AnnounceResponse(0xDEADBEEF, 1800, 5, 10, PEERS)
    assert encode_response(resp) == ANNOUNCE_RESP
    assert parse_response(ANNOUNCE_RESP) == resp


def test_golden_announce_ip_and_numwant():
    raw = bytearray(ANNOUNCE_REQ)
    raw[84:88] = H("c0000207")  # 192.0.2.7
    raw[92:96] = H("00000032")  # num_want 50
    raw[80:84] = H("00000003")  # stopped
    a = parse_request(bytes(raw)).announce
    assert (a.ip, a.numwant, a.event) == ("192.0.2.7", 50, Event.STOPPED)
    assert encode_request(AnnounceRequest(0x0123456789ABCDEF, 0xDEADBEEF, a)) == bytes(raw)


def test_golden_ipv6_announce_response():
    resp = AnnounceResponse(7, 60, 0, 1, (P6,))
    raw = H("00000001" "00000007" "0000003c" "00000000" "00000001" "20010db8") + bytes(11) + H(
        "01" "c8d5"
    )
    assert encode_response(resp, ipv6=True) == raw
    assert parse_response(raw, ipv6=True) == resp


def test_peers_of_the_other_family_are_left_out():
    resp = AnnounceResponse(7, 60, 0, 1, (PEERS[0], P6, PEERS[1]))
    assert parse_response(encode_response(resp)).peers == PEERS
    assert parse_response(encode_response(resp, ipv6=True), ipv6=True).peers == (P6,)


def test_golden_scrape_and_error():
    req = ScrapeRequest(0x0123456789ABCDEF, 7, (IH, b"\xff" * 20))
    assert encode_request(req) == SCRAPE_REQ
    assert parse_request(SCRAPE_REQ) == req
    resp = ScrapeResponse(7, (ScrapeStats(1, 2, 3), ScrapeStats(4, 5, 6)))
    assert encode_response(resp) == SCRAPE_RESP
    assert parse_response(SCRAPE_RESP) == resp
    err = ErrorResponse(7, "no such torrent")
    assert encode_response(err) == ERROR_RESP
    assert parse_response(ERROR_RESP) == err
    assert parse_response(H("00000003" "00000007") + b"\xff") == ErrorResponse(7, "\ufffd")


# -- BEP 41 options ------------------------------------------------------------------


def test_bep41_url_data_golden():
    req = AnnounceRequest(1, 2, ANNOUNCE, url_data=b"/abc/announce?x=1")
    raw = encode_request(req)
    assert raw[98:] == b"\x02\x11/abc/announce?x=1"
    assert parse_request(raw) == req


def test_bep41_long_url_data_is_chunked():
    url = bytes(range(256)) * 2 + b"/end"
    raw = encode_request(AnnounceRequest(1, 2, ANNOUNCE, url_data=url))
    assert raw[98] == 2 and raw[99] == 255 and raw[98 + 257] == 2
    assert parse_request(raw).url_data == url


@pytest.mark.parametrize(
    "options,url",
    [
        (b"", b""),
        (b"\x00", b""),
        (b"\x01\x01\x02\x04/abc\x01\x02\x09/announce\x00garbage", b"/abc/announce"),
        (b"\x02\x00", b""),
        (b"\x09\x03xyz\x02\x01/", b"/"),  # unknown option type skipped by length
    ],
)
def test_bep41_options(options, url):
    assert parse_request(ANNOUNCE_REQ + options).url_data == url


@pytest.mark.parametrize(
    "options",
    [
        b"\x02",  # URLData without its length byte
        b"\x02\x05/abc",  # data overruns the datagram
        b"\x02\x04/abc\x02\xff/x",
        b"\x01\x09",  # unknown type without length
        b"\x09\x10abc",
    ],
)
def test_bep41_option_overruns(options):
    assert reason_of(parse_request, ANNOUNCE_REQ + options) == "bad_option"


def test_bep41_url_data_bound():
    many = b"\x02\xff" + b"u" * 255
    assert reason_of(parse_request, ANNOUNCE_REQ + many * 5) == "too_long"
    with pytest.raises(LocalProtocolError):
        AnnounceRequest(1, 2, ANNOUNCE, url_data=b"u" * (udp.MAX_URL_DATA + 1))


# -- strictness ---------------------------------------------------------------------


def _scrape(n: int) -> bytes:
    return H("0123456789abcdef" "00000002" "00000007") + IH * n


def _patch(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value):]


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"", "truncated"),
        (CONNECT_REQ[:15], "truncated"),
        (_patch(CONNECT_REQ, 0, H("0000041727101981")), "bad_protocol_id"),
        (_patch(CONNECT_REQ, 0, bytes(8)), "bad_protocol_id"),
        (CONNECT_REQ + b"\x00", "bad_length"),
        (ANNOUNCE_REQ[:97], "truncated"),
        (_patch(ANNOUNCE_REQ, 8, H("00000004")), "bad_action"),
        (_patch(ANNOUNCE_REQ, 8, H("00000003")), "bad_action"),
        (_patch(ANNOUNCE_REQ, 8, H("ffffffff")), "bad_action"),
        (_patch(ANNOUNCE_REQ, 80, H("00000004")), "bad_event"),
        (_patch(ANNOUNCE_REQ, 56, H("ffffffffffffffff")), "bad_number"),  # downloaded -1
        (_patch(ANNOUNCE_REQ, 64, H("8000000000000000")), "bad_number"),  # left
        (_patch(ANNOUNCE_REQ, 72, H("ffffffffffffff00")), "bad_number"),  # uploaded
        (_patch(ANNOUNCE_REQ, 92, H("fffffffe")), "bad_number"),  # num_want -2
        (_scrape(0), "bad_length"),
        (_scrape(1) + b"\x00", "bad_length"),
        (_scrape(1)[:-1], "bad_length"),
        (_scrape(75), "too_many_hashes"),
        (ANNOUNCE_REQ + b"\x01" * 2000, "too_long"),
    ],
)
def test_request_rejections(raw, reason):
    assert reason_of(parse_request, raw) == reason


def test_scrape_hash_limit_is_exact():
    assert len(parse_request(_scrape(udp.MAX_SCRAPE_HASHES)).info_hashes) == 74
    assert len(_scrape(74)) == 1496


@pytest.mark.parametrize(
    "raw,kw,reason",
    [
        (b"\x00" * 7, {}, "truncated"),
        (CONNECT_RESP[:15], {}, "truncated"),
        (CONNECT_RESP + b"\x00", {}, "bad_length"),
        (ANNOUNCE_RESP[:19], {}, "truncated"),
        (ANNOUNCE_RESP + b"\x00", {}, "bad_length"),
        (ANNOUNCE_RESP, {"ipv6": True}, "bad_length"),
        (_patch(ANNOUNCE_RESP, 8, H("ffffffff")), {}, "bad_number"),
        (_patch(ANNOUNCE_RESP, 12, H("80000000")), {}, "bad_number"),
        (SCRAPE_RESP[:-1], {}, "bad_length"),
        (_patch(SCRAPE_RESP, 8, H("ffffffff")), {}, "bad_number"),
        (_patch(CONNECT_RESP, 0, H("00000004")), {}, "bad_action"),
    ],
)
def test_response_rejections(raw, kw, reason):
    assert reason_of(parse_response, raw, **kw) == reason


def test_local_errors():
    with pytest.raises(LocalProtocolError):
        ConnectRequest(-1)
    with pytest.raises(LocalProtocolError):
        ConnectResponse(1, 2**64)
    with pytest.raises(LocalProtocolError):
        ScrapeRequest(1, 1, ())
    with pytest.raises(LocalProtocolError):
        ScrapeRequest(1, 1, (IH,) * 75)
    with pytest.raises(LocalProtocolError):
        AnnounceResponse(1, -5, 0, 0, ())
    with pytest.raises(LocalProtocolError):
        encode_request(AnnounceRequest(1, 1, Announce(IH, PID, 1, 0, 0, 0, key=b"12345")))
    with pytest.raises(LocalProtocolError):
        encode_request(AnnounceRequest(1, 1, Announce(IH, PID, 1, 0, 0, 0, ip="::1")))
    with pytest.raises(LocalProtocolError):
        encode_request(AnnounceRequest(1, 1, Announce(IH, PID, 1, 0, 0, 0, trackerid=b"t")))
    with pytest.raises(LocalProtocolError):
        encode_response(ScrapeResponse(1, (ScrapeStats(2**31, 0, 0),)))
    with pytest.raises(LocalProtocolError):
        encode_response(ErrorResponse(1, "x" * 2000))
    with pytest.raises(LocalProtocolError):
        encode_response(ConnectRequest(1))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        encode_request(ConnectResponse(1, 1))  # type: ignore[arg-type]


# -- truncation --------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [CONNECT_REQ, ANNOUNCE_REQ])
def test_every_strict_prefix_of_a_fixed_request_is_rejected(raw):
    for i in range(len(raw)):
        assert reason_of(parse_request, raw[:i]) == "truncated"


def test_every_strict_prefix_of_a_connect_response_is_rejected():
    for i in range(len(CONNECT_RESP)):
        assert reason_of(parse_response, CONNECT_RESP[:i]) == "truncated"


@pytest.mark.parametrize(
    "raw,parse,kw",
    [
        (SCRAPE_REQ, parse_request, {}),
        (encode_request(AnnounceRequest(1, 2, ANNOUNCE, url_data=b"/k/announce")), parse_request, {}),
        (ANNOUNCE_RESP, parse_response, {}),
        (encode_response(AnnounceResponse(1, 2, 3, 4, (P6, P6)), ipv6=True), parse_response,
         {"ipv6": True}),
        (SCRAPE_RESP, parse_response, {}),
        (ERROR_RESP, parse_response, {}),
    ],
)
def test_strict_prefixes_of_variable_datagrams_never_yield_the_original(raw, parse, kw):
    # Datagrams are self-delimiting: a prefix ending on a record boundary is a
    # valid *smaller* message (UDP never delivers one); any other prefix is
    # rejected. Either way the original value is never produced.
    original = parse(raw, **kw)
    for i in range(len(raw)):
        assert parses_or_remote(parse, raw[:i], **kw) != original


# -- round trips --------------------------------------------------------------------------

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
I31 = st.integers(0, 2**31 - 1)
hashes = st.binary(min_size=20, max_size=20)

udp_announces = st.builds(
    Announce,
    info_hash=hashes,
    peer_id=hashes,
    port=st.integers(0, 65535),
    uploaded=st.integers(0, 2**63 - 1),
    downloaded=st.integers(0, 2**63 - 1),
    left=st.integers(0, 2**63 - 1),
    event=st.sampled_from(Event),
    numwant=st.none() | I31,
    key=st.binary(min_size=4, max_size=4),
    ip=st.none() | st.ip_addresses(v=4).filter(lambda a: int(a) != 0).map(str),
)

requests = st.one_of(
    st.builds(ConnectRequest, U32),
    st.builds(AnnounceRequest, U64, U32, udp_announces, st.binary(max_size=udp.MAX_URL_DATA)),
    st.builds(ScrapeRequest, U64, U32, st.lists(hashes, min_size=1, max_size=74).map(tuple)),
)


def peers(v: int):
    ips = st.ip_addresses(v=v)
    if v == 6:
        ips = ips.filter(lambda a: a.ipv4_mapped is None)
    return st.builds(Peer, ips.map(str), st.integers(0, 65535))


def responses(v: int):
    return st.one_of(
        st.builds(ConnectResponse, U32, U64),
        st.builds(AnnounceResponse, U32, I31, I31, I31, st.lists(peers(v), max_size=30).map(tuple)),
        st.builds(ScrapeResponse, U32, st.lists(st.builds(ScrapeStats, I31, I31, I31),
                                                max_size=74).map(tuple)),
        st.builds(ErrorResponse, U32, st.text(st.characters(exclude_categories=("Cs",)),
                                              max_size=50)),
    )


@FAST
@given(requests)
def test_request_roundtrip(req):
    assert parse_request(encode_request(req)) == req


@HEAVY
@given(st.sampled_from([4, 6]).flatmap(lambda v: st.tuples(st.just(v), responses(v))))
def test_response_roundtrip(pair):
    v, resp = pair
    raw = encode_response(resp, ipv6=v == 6)
    assert parse_response(raw, ipv6=v == 6) == resp


# -- fuzz invariant ---------------------------------------------------------------------


@FAST
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    parses_or_remote(parse_request, data)
    parses_or_remote(parse_response, data)
    parses_or_remote(parse_response, data, ipv6=True)


@FAST
@given(mutated(requests.map(encode_request)))
def test_fuzz_mutated_requests(data):
    parses_or_remote(parse_request, data)


@FAST
@given(mutated(responses(4).map(encode_response)))
def test_fuzz_mutated_responses(data):
    parses_or_remote(parse_response, data)
    parses_or_remote(parse_response, data, ipv6=True)


def test_constants():
    assert udp.PROTOCOL_ID == 0x41727101980
    assert (udp.CONNECT, udp.ANNOUNCE, udp.SCRAPE, udp.ERROR) == (0, 1, 2, 3)
    assert udp.MAX_SCRAPE_HASHES == 74
    assert len(set(udp.REASONS)) == len(udp.REASONS)
