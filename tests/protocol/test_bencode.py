"""Tests for shoal.protocol.bencode: golden bytes, truncation, round-trips, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol import bencode
from shoal.protocol.bencode import decode, decode_prefix, encode
from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError

from .fuzz import mutated

FAST = settings(max_examples=300, deadline=None)
# Tests whose examples are large recursive structures: fewer examples keep
# the suite fast while each example already covers many sub-cases.
HEAVY = settings(max_examples=150, deadline=None)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)

# Canonical decoded values: what decode() returns.
values = st.recursive(
    INT64 | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.binary(max_size=10), children, max_size=6),
    max_leaves=30,
)


def parses_or_remote(fn, data, **kw):
    """The fuzz invariant: a value, or RemoteProtocolError with a known reason."""
    try:
        return fn(data, **kw)
    except RemoteProtocolError as exc:
        assert exc.reason in bencode.REASONS, exc.reason
        return None


def reason_of(data, **kw) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        decode(data, **kw)
    assert info.value.reason in bencode.REASONS
    return info.value.reason


# -- golden bytes ------------------------------------------------------------

GOLDEN = [
    (0, b"i0e"),
    (42, b"i42e"),
    (-3, b"i-3e"),
    (2**63 - 1, b"i9223372036854775807e"),
    (-(2**63), b"i-9223372036854775808e"),
    (b"", b"0:"),
    (b"spam", b"4:spam"),
    (b"\x00\xff:e", b"4:\x00\xff:e"),
    ([], b"le"),
    ({}, b"de"),
    ([b"spam", 42], b"l4:spami42ee"),
    ({b"bar": b"spam", b"foo": 42}, b"d3:bar4:spam3:fooi42ee"),
    ({b"a": [{b"b": []}]}, b"d1:ald1:bleeee"),
]


@pytest.mark.parametrize("value,raw", GOLDEN)
def test_golden_encode(value, raw):
    assert encode(value) == raw


@pytest.mark.parametrize("value,raw", GOLDEN)
def test_golden_decode(value, raw):
    assert decode(raw) == value
    assert decode_prefix(raw) == (value, len(raw))


def test_encode_accepts_str_tuple_and_sorts_by_raw_bytes():
    value = {"zeta": 1, b"\xff": 2, "alpha": ("x", b"y"), "\u00e9": 3}
    # "\u00e9" is b"\xc3\xa9", which sorts after ASCII and before b"\xff".
    assert encode(value) == b"d5:alphal1:x1:ye4:zetai1e2:\xc3\xa9i3e1:\xffi2ee"


@pytest.mark.parametrize(
    "value",
    [True, False, None, 1.5, {1: 2}, {b"a": 1, "a": 2}, 2**63, -(2**63) - 1, "\ud800", object()],
)
def test_encode_misuse_is_local_error(value):
    with pytest.raises(LocalProtocolError):
        encode(value)


def test_encode_depth_is_bounded_like_decode():
    deep: list = []
    for _ in range(bencode.DEFAULT_MAX_DEPTH - 1):
        deep = [deep]
    assert decode(encode(deep)) == deep
    with pytest.raises(LocalProtocolError):
        encode([deep])
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(LocalProtocolError):
        encode(cyclic)


# -- strictness ----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"i03e", "bad_integer"),
        (b"i-0e", "bad_integer"),
        (b"ie", "bad_integer"),
        (b"i-e", "bad_integer"),
        (b"i+1e", "bad_integer"),
        (b"i 1e", "bad_integer"),
        (b"i1.0e", "bad_integer"),
        (b"i9223372036854775808e", "bad_integer"),
        (b"i-9223372036854775809e", "bad_integer"),
        (b"i" + b"1" * 10000 + b"e", "bad_integer"),
        (b"03:abc", "bad_length"),
        (b"-1:a", "bad_token"),
        (b"3x:abc", "bad_length"),
        (b"99999999999:", "too_long"),
        (b"9" * 30 + b":", "bad_length"),
        (b"d1:bi1e1:ai2ee", "unsorted_keys"),
        (b"d1:ai1e1:ai2ee", "duplicate_key"),
        (b"d2:abi1e1:ai2ee", "unsorted_keys"),
        (b"di1ei2ee", "bad_key"),
        (b"dlei2ee", "bad_key"),
        (b"d1:ae", "missing_value"),
        (b"e", "bad_token"),
        (b"x", "bad_token"),
        (b"", "truncated"),
        (b"i1ei2e", "trailing_data"),
        (b"le\n", "trailing_data"),
        (b"l" * 100000, "too_deep"),
        (b"d1:a" * 100000, "too_deep"),
    ],
)
def test_strict_rejections(raw, reason):
    assert reason_of(raw) == reason


def test_depth_limit_is_exact():
    ok = b"l" * 64 + b"e" * 64
    assert decode_prefix(ok)[1] == len(ok)
    assert reason_of(b"l" * 65 + b"e" * 65) == "too_deep"
    assert reason_of(b"l" * 3 + b"e" * 3, max_depth=2) == "too_deep"
    assert decode(b"llee", max_depth=2) == [[]]


def test_size_limit():
    assert decode(b"4:spam", max_size=6) == b"spam"
    assert reason_of(b"4:spam", max_size=5) == "too_long"
    # A length prefix beyond the limit fails at once, before the data exists.
    assert reason_of(b"1000:", max_size=100) == "too_long"
    with pytest.raises(RemoteProtocolError) as info:
        decode_prefix(b"10:" + b"x" * 20, max_size=12)
    assert info.value.reason == "too_long"


def test_decoded_types_and_keys():
    v = decode(b"d1:al1:bi1eee")
    assert type(v) is dict and list(v) == [b"a"] and v[b"a"] == [b"b", 1]


def test_non_bytes_input_is_local_error():
    with pytest.raises(LocalProtocolError):
        decode("i1e")  # type: ignore[arg-type]
    assert decode(bytearray(b"i1e")) == 1
    assert decode(memoryview(b"i1e")) == 1


# -- truncation and decode_prefix ---------------------------------------------


@pytest.mark.parametrize("value,raw", GOLDEN)
def test_every_strict_prefix_is_truncated(value, raw):
    for i in range(len(raw)):
        with pytest.raises(RemoteProtocolError) as info:
            decode(raw[:i])
        assert info.value.reason == "truncated", (raw[:i], info.value.reason)


@HEAVY
@given(values, st.binary(max_size=8))
def test_growing_prefix_never_yields_a_wrong_value(value, trailer):
    raw = encode(value)
    stream = raw + trailer
    for i in range(len(stream) + 1):
        try:
            got, end = decode_prefix(stream[:i])
        except RemoteProtocolError as exc:
            assert i < len(raw) and exc.reason == "truncated"
        else:
            assert i >= len(raw) and (got, end) == (value, len(raw))


def test_decode_prefix_span_of_info_dict():
    info = {b"length": 5, b"name": b"a.txt", b"piece length": 16384, b"pieces": b"\x01" * 20}
    torrent = encode({b"announce": b"http://t/announce", b"info": info})
    start = torrent.index(b"4:info") + len(b"4:info")
    got, end = decode_prefix(torrent, start)
    assert got == info
    assert torrent[start:end] == encode(info)
    assert end == len(torrent) - 1  # only the outer dict's "e" follows


def test_decode_prefix_offsets():
    assert decode_prefix(b"xxi5eyy", 2) == (5, 5)
    with pytest.raises(LocalProtocolError):
        decode_prefix(b"i1e", 4)


# -- round trips ---------------------------------------------------------------


@HEAVY
@given(values)
def test_roundtrip(value):
    raw = encode(value)
    assert decode(raw) == value
    assert decode_prefix(raw) == (value, len(raw))


# -- fuzz invariant ------------------------------------------------------------

ALPHABET = st.sampled_from(list(b"ilde0123456789:-"))


@FAST
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    parses_or_remote(decode, data)
    parses_or_remote(decode_prefix, data)


@FAST
@given(st.lists(ALPHABET, max_size=120).map(bytes))
def test_fuzz_bencode_alphabet_and_canonical_reencode(data):
    v = parses_or_remote(decode, data, max_depth=8)
    if v is not None:
        # Strictness means there is exactly one encoding of every value.
        assert encode(v) == data


@HEAVY
@given(mutated(values.map(encode)))
def test_fuzz_mutated_valid_values(data):
    v = parses_or_remote(decode, data)
    if v is not None:
        assert encode(v) == data
