"""Tests for shoal.protocol.tracker (HTTP tracker: BEP 3, 7, 23, 48)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol import bencode, tracker
from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError
from shoal.protocol.tracker import (
    Announce,
    AnnounceResponse,
    Event,
    Failure,
    Peer,
    Scrape,
    ScrapeStats,
    decode_announce_response,
    decode_scrape_response,
    encode_announce_query,
    encode_announce_response,
    encode_failure,
    encode_scrape_query,
    encode_scrape_response,
    parse_announce_query,
    parse_scrape_query,
    split_target,
)

from .fuzz import checkers, mutated

FAST = settings(max_examples=300, deadline=None)
# Tests whose examples are large recursive structures: fewer examples keep
# the suite fast while each example already covers many sub-cases.
HEAVY = settings(max_examples=150, deadline=None)

IH = bytes(range(1, 21))  # 01 02 ... 14
PID = b"-SH0100-abcdefghijkl"
IH_Q = b"%01%02%03%04%05%06%07%08%09%0A%0B%0C%0D%0E%0F%10%11%12%13%14"


parses_or_remote, reason_of = checkers(tracker.REASONS)


def q(**params: bytes) -> bytes:
    base = {
        "info_hash": IH_Q,
        "peer_id": PID,
        "port": b"6881",
        "uploaded": b"0",
        "downloaded": b"0",
        "left": b"100",
    }
    base.update(params)
    return b"&".join(k.encode() + b"=" + v for k, v in base.items() if v is not None)


# -- strategies ------------------------------------------------------------------

hashes = st.binary(min_size=20, max_size=20)
U63 = st.integers(0, 2**63 - 1)


ips = st.ip_addresses().filter(
    lambda a: not (a.version == 6 and a.ipv4_mapped is not None)
).map(str)

announces = st.builds(
    Announce,
    info_hash=hashes,
    peer_id=hashes,
    port=st.integers(0, 65535),
    uploaded=U63,
    downloaded=U63,
    left=U63,
    event=st.sampled_from(Event),
    numwant=st.none() | st.integers(0, 2**31 - 1),
    compact=st.booleans(),
    no_peer_id=st.booleans(),
    key=st.none() | st.binary(max_size=tracker.MAX_KEY_LENGTH),
    ip=st.none() | ips,
    trackerid=st.none() | st.binary(max_size=40),
)

peers = st.builds(Peer, ip=ips, port=st.integers(0, 65535), peer_id=st.none() | hashes)

responses = st.builds(
    AnnounceResponse,
    interval=st.integers(0, 2**31 - 1),
    min_interval=st.none() | st.integers(0, 2**31 - 1),
    complete=U63,
    incomplete=U63,
    peers=st.lists(peers, max_size=20).map(tuple),
    tracker_id=st.none() | st.binary(max_size=30),
    warning=st.none() | st.text(st.characters(exclude_categories=("Cs",)), max_size=30),
)


# -- split_target --------------------------------------------------------------


def test_split_target():
    assert split_target(b"/announce?a=1&b=2") == (b"/announce", b"a=1&b=2")
    assert split_target(b"/abc/announce") == (b"/abc/announce", b"")
    assert split_target(b"/scrape?x=?y") == (b"/scrape", b"x=?y")
    assert split_target(b"/announce?") == (b"/announce", b"")


# -- announce query: golden ------------------------------------------------------


def test_golden_parse_announce_query():
    raw = (
        b"info_hash=" + IH_Q + b"&peer_id=-SH0100-abcdefghijkl&port=6881&uploaded=10"
        b"&downloaded=20&left=30&event=started&numwant=50&compact=1&no_peer_id=1"
        b"&key=%DE%AD%be%ef&ip=192.0.2.7&trackerid=tr%21"
        b"&supportcrypto=1&corrupt=0&redundant=0&ipv6=2001%3Adb8%3A%3A1&ipv6=x"
    )
    assert parse_announce_query(raw) == Announce(
        info_hash=IH, peer_id=PID, port=6881, uploaded=10, downloaded=20, left=30,
        event=Event.STARTED, numwant=50, compact=True, no_peer_id=True,
        key=b"\xde\xad\xbe\xef", ip="192.0.2.7", trackerid=b"tr!",
    )


def test_golden_encode_announce_query():
    a = Announce(IH, PID, 6881, 10, 20, 30, Event.COMPLETED, numwant=0, compact=False,
                 key=b"k 1", ip="2001:db8::1")
    assert encode_announce_query(a) == (
        b"info_hash=" + IH_Q + b"&peer_id=-SH0100-abcdefghijkl&port=6881&uploaded=10"
        b"&downloaded=20&left=30&event=completed&numwant=0&compact=0&key=k%201"
        b"&ip=2001%3Adb8%3A%3A1"
    )
    minimal = Announce(IH, PID, 0, 0, 0, 0)
    assert encode_announce_query(minimal) == (
        b"info_hash=" + IH_Q + b"&peer_id=-SH0100-abcdefghijkl&port=0&uploaded=0"
        b"&downloaded=0&left=0&compact=1"
    )


def test_defaults_when_optional_parameters_absent():
    a = parse_announce_query(q())
    assert (a.event, a.numwant, a.compact, a.no_peer_id, a.key, a.ip, a.trackerid) == (
        Event.NONE, None, True, False, None, None, None,
    )


def test_plus_is_a_literal_plus_not_space():
    h = b"+" * 20
    a = parse_announce_query(q(info_hash=h))
    assert a.info_hash == b"+" * 20
    assert parse_announce_query(q(info_hash=b"%2B" * 20)).info_hash == h


def test_lowercase_and_mixed_escapes_and_escaped_keys():
    assert parse_announce_query(q(info_hash=IH_Q.lower())).info_hash == IH
    raw = q().replace(b"info_hash", b"info%5Fhash")
    assert parse_announce_query(raw).info_hash == IH


def test_empty_segments_are_skipped():
    assert parse_announce_query(b"&&" + q() + b"&").info_hash == IH


@pytest.mark.parametrize(
    "value,event",
    [(b"", Event.NONE), (b"started", Event.STARTED), (b"completed", Event.COMPLETED),
     (b"stopped", Event.STOPPED), (b"paused", Event.NONE)],
)
def test_events(value, event):
    assert parse_announce_query(q(event=value)).event is event


def test_event_udp_mapping():
    assert [Event.from_udp(i) for i in range(4)] == [
        Event.NONE, Event.COMPLETED, Event.STARTED, Event.STOPPED
    ]
    assert [e.udp for e in (Event.NONE, Event.COMPLETED, Event.STARTED, Event.STOPPED)] == [0, 1, 2, 3]
    with pytest.raises(RemoteProtocolError):
        Event.from_udp(4)
    assert Event.STARTED.http == b"started"


def test_ip_is_normalised():
    assert parse_announce_query(q(ip=b"%3A%3Affff%3A192.0.2.1")).ip == "192.0.2.1"
    assert parse_announce_query(q(ip=b"2001%3ADB8%3A0%3A%3A1")).ip == "2001:db8::1"
    assert Announce(IH, PID, 1, 0, 0, 0, ip="2001:DB8::0:1").ip == "2001:db8::1"


# -- announce query: strictness ----------------------------------------------------


@pytest.mark.parametrize(
    "raw,reason",
    [
        (q(info_hash=None), "missing_field"),
        (q(peer_id=None), "missing_field"),
        (q(port=None), "missing_field"),
        (q(uploaded=None), "missing_field"),
        (q(downloaded=None), "missing_field"),
        (q(left=None), "missing_field"),
        (q() + b"&port=1", "duplicate_key"),
        (q() + b"&info%5fhash=" + IH_Q, "duplicate_key"),
        (q(info_hash=IH_Q[:-3]), "bad_info_hash"),
        (q(info_hash=IH_Q + b"A"), "bad_info_hash"),
        (q(info_hash=b""), "bad_info_hash"),
        (q(peer_id=PID[:19]), "bad_peer_id"),
        (q(info_hash=IH_Q[:-1]), "bad_escape"),  # "%1" at the end
        (q(info_hash=IH_Q[:-2] + b"zz"), "bad_escape"),
        (q(left=b"%"), "bad_escape"),
        (q(foo=b"%g0"), "bad_escape"),  # even in an ignored parameter
        (q(peer_id=b"-SH0100-abcdefghij l"), "bad_escape"),  # raw space
        (q(peer_id=b"-SH0100-abcdefghij\x80l"), "bad_escape"),
        (q(port=b"65536"), "bad_port"),
        (q(port=b"06881"), "bad_port"),
        (q(port=b"-1"), "bad_port"),
        (q(port=b""), "bad_port"),
        (q(left=b"01"), "bad_number"),
        (q(left=b"-0"), "bad_number"),
        (q(left=b"+1"), "bad_number"),
        (q(left=b"9223372036854775808"), "bad_number"),
        (q(left=b"1" * 5000)[:4096], "bad_number"),
        (q(uploaded=b"1e3"), "bad_number"),
        (q(numwant=b"-1"), "bad_number"),
        (q(numwant=b"2147483648"), "bad_number"),
        (q(compact=b"2"), "bad_flag"),
        (q(compact=b""), "bad_flag"),
        (q(no_peer_id=b"true"), "bad_flag"),
        (q(event=b"start"), "bad_event"),
        (q(event=b"STARTED"), "bad_event"),
        (q(ip=b"tracker.example.org"), "bad_ip"),
        (q(ip=b"1.2.3.04"), "bad_ip"),
        (q(ip=b"fe80%3A%3A1%25eth0"), "bad_ip"),
        (q(ip=b"%FF"), "bad_ip"),
        (q(key=b"k" * 65), "too_long"),
        (q(trackerid=b"t" * 256), "too_long"),
        (q(pad=b"x" * 5000), "too_long"),
    ],
)
def test_announce_query_rejections(raw, reason):
    assert reason_of(parse_announce_query, raw) == reason


def test_unknown_keys_are_ignored_even_duplicated():
    raw = q() + b"&supportcrypto=1&supportcrypto=1&requirecrypto=0&key=abc&ipv4=1.2.3.4"
    assert parse_announce_query(raw).key == b"abc"


def test_max_length_parameter():
    raw = q()
    assert parse_announce_query(raw, max_length=len(raw)).info_hash == IH
    assert reason_of(parse_announce_query, raw, max_length=len(raw) - 1) == "too_long"


def test_announce_validation_is_local_error():
    with pytest.raises(LocalProtocolError):
        Announce(IH[:19], PID, 1, 0, 0, 0)
    with pytest.raises(LocalProtocolError):
        Announce(IH, PID, 70000, 0, 0, 0)
    with pytest.raises(LocalProtocolError):
        Announce(IH, PID, True, 0, 0, 0)  # bool is not a port
    with pytest.raises(LocalProtocolError):
        Announce(IH, PID, 1, -1, 0, 0)
    with pytest.raises(LocalProtocolError):
        Announce(IH, PID, 1, 0, 0, 0, event="started")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        Announce(IH, PID, 1, 0, 0, 0, ip="example.org")
    with pytest.raises(LocalProtocolError):
        Peer("1.2.3.4", 1, peer_id=b"short")


def test_query_prefixes_never_yield_the_original():
    a = parse_announce_query(q(event=b"stopped", numwant=b"30", key=b"%01%02"))
    raw = encode_announce_query(a)
    for i in range(len(raw)):
        got = parses_or_remote(parse_announce_query, raw[:i])
        assert got != a


# -- scrape query --------------------------------------------------------------------


def test_golden_scrape_query():
    other = b"\xff" * 20
    raw = b"info_hash=" + IH_Q + b"&info_hash=" + b"%FF" * 20
    assert encode_scrape_query(Scrape((IH, other))) == raw
    assert parse_scrape_query(raw) == Scrape((IH, other))
    assert parse_scrape_query(b"") == Scrape(())
    assert parse_scrape_query(b"passkey=x&info_hash=" + IH_Q) == Scrape((IH,))
    # a repeated hash is kept: the caller answers per requested hash
    assert parse_scrape_query(raw + b"&info_hash=" + IH_Q).info_hashes == (IH, other, IH)


def test_scrape_query_rejections():
    one = b"info_hash=" + IH_Q
    assert reason_of(parse_scrape_query, b"&".join([one] * 65)) == "too_many_hashes"
    assert parse_scrape_query(b"&".join([one] * 64)).info_hashes == (IH,) * 64
    assert reason_of(parse_scrape_query, b"&".join([one] * 3), max_hashes=2) == "too_many_hashes"
    assert reason_of(parse_scrape_query, b"info_hash=abc") == "bad_info_hash"
    assert reason_of(parse_scrape_query, b"info_hash=%zz") == "bad_escape"
    assert reason_of(parse_scrape_query, b"x=" + b"y" * 9000) == "too_long"


# -- responses: golden ------------------------------------------------------------------

P1 = Peer("10.0.0.1", 6881, b"A" * 20)
P2 = Peer("192.168.1.2", 6882, b"B" * 20)
P6 = Peer("2001:db8::1", 51413)


def test_golden_compact_response_two_peers():
    resp = AnnounceResponse(1800, None, 1, 2, (P1, P2))
    raw = (
        b"d8:completei1e10:incompletei2e8:intervali1800e5:peers12:"
        b"\x0a\x00\x00\x01\x1a\xe1\xc0\xa8\x01\x02\x1a\xe2e"
    )
    assert encode_announce_response(resp) == raw
    assert decode_announce_response(raw) == AnnounceResponse(
        1800, None, 1, 2, (Peer("10.0.0.1", 6881), Peer("192.168.1.2", 6882))
    )


def test_golden_compact_response_with_peers6_and_all_keys():
    resp = AnnounceResponse(900, 60, 0, 7, (P6, P1), tracker_id=b"T1", warning="slow \u00e9")
    raw = (
        b"d8:completei0e10:incompletei7e8:intervali900e12:min intervali60e"
        b"5:peers6:\x0a\x00\x00\x01\x1a\xe1"
        b"6:peers618:\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01\xc8\xd5"
        b"10:tracker id2:T115:warning message7:slow \xc3\xa9e"
    )
    assert encode_announce_response(resp) == raw
    assert decode_announce_response(raw) == AnnounceResponse(
        900, 60, 0, 7, (Peer("10.0.0.1", 6881), P6), b"T1", "slow \u00e9"
    )


def test_golden_dict_peers_response():
    resp = AnnounceResponse(1800, None, 1, 1, (P1, P6))
    raw = (
        b"d8:completei1e10:incompletei1e8:intervali1800e5:peersl"
        b"d2:ip8:10.0.0.17:peer id20:AAAAAAAAAAAAAAAAAAAA4:porti6881ee"
        b"d2:ip11:2001:db8::14:porti51413ee"
        b"ee"
    )
    assert encode_announce_response(resp, compact=False) == raw
    assert decode_announce_response(raw) == resp
    no_ids = encode_announce_response(resp, compact=False, no_peer_id=True)
    assert b"peer id" not in no_ids
    assert decode_announce_response(no_ids).peers == (Peer("10.0.0.1", 6881), P6)


def test_golden_failure_and_scrape():
    assert encode_failure("not registered") == b"d14:failure reason14:not registerede"
    assert decode_announce_response(b"d14:failure reason14:not registerede") == Failure(
        "not registered"
    )
    assert decode_scrape_response(b"d14:failure reason3:no!e") == Failure("no!")
    files = {b"\xff" * 20: ScrapeStats(1, 2, 3), IH: ScrapeStats(4, 5, 6)}
    raw = (
        b"d5:filesd20:" + IH + b"d8:completei4e10:downloadedi5e10:incompletei6ee"
        b"20:" + b"\xff" * 20 + b"d8:completei1e10:downloadedi2e10:incompletei3eeee"
    )
    assert encode_scrape_response(files) == raw
    assert decode_scrape_response(raw) == files
    assert encode_scrape_response({}) == b"d5:filesdee"


def test_decoder_tolerances():
    # no complete/incomplete, only peers6, unknown keys, non-UTF-8 failure text
    raw = bencode.encode({b"interval": 5, b"peers6": b"", b"x-extra": [1]})
    assert decode_announce_response(raw) == AnnounceResponse(5, None, 0, 0, ())
    assert decode_announce_response(b"d14:failure reason2:\xff!e") == Failure("\ufffd!")


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"le", "bad_type"),
        (b"d8:intervali1ee", "missing_field"),
        (b"d5:peers0:e", "missing_field"),
        (b"d8:intervali-1e5:peers0:e", "bad_number"),
        (b"d8:interval1:15:peers0:e", "bad_type"),
        (b"d8:intervali1e5:peers7:1234567e", "bad_peers"),
        (b"d8:intervali1e6:peers65:abcdee", "bad_peers"),
        (b"d8:intervali1e5:peersi3ee", "bad_type"),
        (b"d8:intervali1e5:peersld2:ip9:host.name4:porti1eeee", "bad_peers"),
        (b"d8:intervali1e5:peersld2:ip7:1.2.3.44:porti70000eeee", "bad_peers"),
        (b"d8:intervali1e5:peersld4:porti1eeee", "bad_peers"),
        (b"d8:intervali1e5:peersli1eee", "bad_peers"),
        (b"d8:intervali1e5:peersld2:ip7:1.2.3.47:peer id1:x4:porti1eeee", "bad_peers"),
        (b"d5:peers0:8:intervali1ee", "unsorted_keys"),
        (b"d8:intervali1e5:peers0:", "truncated"),
        (b"d14:failure reasoni1ee", "bad_type"),
        (b"d8:intervali1e5:peers0:15:warning messagei1ee", "bad_type"),
        (b"d8:intervali1e5:peers0:10:tracker idi1ee", "bad_type"),
    ],
)
def test_announce_response_rejections(body, reason):
    assert reason_of(decode_announce_response, body) == reason


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"de", "missing_field"),
        (b"d5:filesi1ee", "bad_type"),
        (b"d5:filesd3:abcd8:completei1e10:downloadedi1e10:incompletei1eeee", "bad_info_hash"),
        (b"d5:filesd20:" + IH + b"d8:completei1e10:downloadedi1eeee", "missing_field"),
        (b"d5:filesd20:" + IH + b"i1eee", "bad_type"),
        (b"d5:filesd20:" + IH + b"d8:completei-1e10:downloadedi1e10:incompletei1eeee",
         "bad_number"),
    ],
)
def test_scrape_response_rejections(body, reason):
    assert reason_of(decode_scrape_response, body) == reason


def test_every_strict_prefix_of_a_response_is_rejected():
    bodies = [
        encode_announce_response(AnnounceResponse(1800, 30, 1, 2, (P1, P2, P6), b"t", "w")),
        encode_announce_response(AnnounceResponse(1800, 30, 1, 2, (P1, P6)), compact=False),
        encode_failure("go away"),
        encode_scrape_response({IH: ScrapeStats(1, 2, 3)}),
    ]
    for body in bodies:
        for i in range(len(body)):
            assert reason_of(decode_announce_response, body[:i]) == "truncated"
            assert reason_of(decode_scrape_response, body[:i]) == "truncated"


def test_response_local_errors():
    with pytest.raises(LocalProtocolError):
        AnnounceResponse(-1, None, 0, 0, ())
    with pytest.raises(LocalProtocolError):
        AnnounceResponse(1, None, 0, 0, [P1])  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        encode_scrape_response({b"short": ScrapeStats(0, 0, 0)})
    with pytest.raises(LocalProtocolError):
        encode_failure("\ud800")


# -- round trips ----------------------------------------------------------------------


@FAST
@given(announces)
def test_announce_query_roundtrip(a):
    assert parse_announce_query(encode_announce_query(a)) == a


@FAST
@given(st.lists(hashes, max_size=64).map(tuple))
def test_scrape_query_roundtrip(hs):
    s = Scrape(hs)
    assert parse_scrape_query(encode_scrape_query(s)) == s


@HEAVY
@given(responses)
def test_announce_response_roundtrip(resp):
    # compact: peer ids are not carried, IPv4 peers come before IPv6 ones
    compact = encode_announce_response(resp)
    stripped = [Peer(p.ip, p.port) for p in resp.peers]
    expect = tuple([p for p in stripped if not p.is_ipv6] + [p for p in stripped if p.is_ipv6])
    got = decode_announce_response(compact)
    assert got == AnnounceResponse(
        resp.interval, resp.min_interval, resp.complete, resp.incomplete, expect,
        resp.tracker_id, resp.warning,
    )
    # dict peers: everything, in order
    assert decode_announce_response(encode_announce_response(resp, compact=False)) == resp


@HEAVY
@given(responses)
def test_fast_encoder_matches_generic_bencode(resp):
    d: dict = {b"complete": resp.complete, b"incomplete": resp.incomplete,
               b"interval": resp.interval}
    if resp.min_interval is not None:
        d[b"min interval"] = resp.min_interval
    d[b"peers"] = b"".join(p.compact for p in resp.peers if not p.is_ipv6)
    six = b"".join(p.compact for p in resp.peers if p.is_ipv6)
    if six:
        d[b"peers6"] = six
    if resp.tracker_id is not None:
        d[b"tracker id"] = resp.tracker_id
    if resp.warning is not None:
        d[b"warning message"] = resp.warning
    assert encode_announce_response(resp) == bencode.encode(d)


@HEAVY
@given(st.dictionaries(hashes, st.builds(ScrapeStats, U63, U63, U63), max_size=10))
def test_scrape_response_roundtrip(files):
    raw = encode_scrape_response(files)
    assert decode_scrape_response(raw) == files
    assert bencode.decode(raw) == {
        b"files": {h: {b"complete": s.complete, b"downloaded": s.downloaded,
                       b"incomplete": s.incomplete} for h, s in files.items()}
    }


# -- fuzz invariant --------------------------------------------------------------------

QUERY_BYTES = st.lists(st.sampled_from(list(b"%&=+0123456789aAfFgZ_info_hashpeer_idportleft")),
                       max_size=200).map(bytes)


@FAST
@given(st.binary(max_size=300) | QUERY_BYTES)
def test_fuzz_parsers_random_bytes(data):
    parses_or_remote(parse_announce_query, data)
    parses_or_remote(parse_scrape_query, data)
    parses_or_remote(decode_announce_response, data)
    parses_or_remote(decode_scrape_response, data)


# Fragments that make a mutated query or bencoded body more likely to parse
# a little further before it fails.
QUERY_BITS = (b"%", b"&", b"=", b"e", b"i", b"0", b"&port=1")


def mutate(base):
    return mutated(base, inserts=QUERY_BITS)


@FAST
@given(mutate(announces.map(encode_announce_query)))
def test_fuzz_mutated_queries(data):
    parses_or_remote(parse_announce_query, data)
    parses_or_remote(parse_scrape_query, data)


@HEAVY
@given(mutate(st.tuples(responses, st.booleans())
              .map(lambda t: encode_announce_response(t[0], compact=t[1]))))
def test_fuzz_mutated_responses(data):
    parses_or_remote(decode_announce_response, data)
    parses_or_remote(decode_scrape_response, data)


def test_reasons_are_unique_short_tokens():
    assert len(set(tracker.REASONS)) == len(tracker.REASONS)
    assert all(r.isidentifier() and r.islower() for r in tracker.REASONS)
    assert set(bencode.REASONS) <= set(tracker.REASONS)
