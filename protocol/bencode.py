"""Strict bencoding (BEP 3): the encoding of tracker responses and .torrent files.

Theory of operation
-------------------

Bencode has four kinds of value, each introduced by one byte::

    i<decimal>e          integer        i42e  i-3e  i0e
    <length>:<bytes>     byte string    4:spam  0:
    l<values>e           list           l4:spami42ee
    d<key><value>...e    dictionary     d3:bar4:spam3:fooi42ee

The format is *prefix-free*: no complete value is a proper prefix of another
value, so a decoder always knows where a value ends without a length header.
:func:`decode_prefix` uses this: it decodes one value starting at an offset and
returns the offset just past it, which is how a caller hashes the raw span of a
.torrent's ``info`` dictionary.

Canonical form
~~~~~~~~~~~~~~

Each value has exactly one encoding, and this module *accepts only that one*,
because the info-hash of a torrent is the SHA-1 of the bytes: a lenient decoder
that re-encodes to different bytes silently computes a different hash.

* integers: ``0`` or an optional ``-`` followed by a non-zero digit and more
  digits; so ``i03e``, ``i-0e``, ``ie``, ``i+1e`` and ``i 1e`` are rejected;
* string length prefixes: the same digits rule, without a sign (``03:abc`` is
  rejected);
* dictionary keys are byte strings, in strictly increasing order of their raw
  bytes (an equal key is ``duplicate_key``, a smaller one ``unsorted_keys``).

Bounds
~~~~~~

Every number the peer controls is bounded before it is used:

* integers are limited to signed 64 bits (the largest quantity in any
  BitTorrent structure is a file length or byte counter, which fits in an
  int64; libtorrent has the same limit), and the digits are counted *before*
  calling ``int()`` so a megabyte of digits costs nothing;
* the total size of a value is limited by ``max_size`` (a string whose length
  prefix would pass it fails at once with ``too_long`` rather than waiting for
  data that could never be accepted);
* nesting is limited by ``max_depth``. The decoder is iterative (an explicit
  stack), so even ``b"l" * 10**6`` cannot raise ``RecursionError``.

Errors
~~~~~~

For *any* ``bytes`` input the decoders return a value or raise
:class:`RemoteProtocolError` whose ``reason`` is one of :data:`REASONS`.
``"truncated"`` is raised only when the input is a valid *prefix* of some
acceptable value, i.e. when more bytes could have completed it; every other
token means no continuation can help.

Encoding accepts ``int`` (not ``bool``), ``bytes``/``bytearray``/``memoryview``,
``str`` (as UTF-8), ``list``/``tuple`` and ``dict`` with ``bytes`` or ``str``
keys (emitted sorted by their raw bytes). Anything else, an integer outside
int64, two keys that encode to the same bytes (``b"a"`` and ``"a"``) or nesting
deeper than :data:`DEFAULT_MAX_DEPTH` raises :class:`LocalProtocolError`: what we
encode, we can decode.
"""

from __future__ import annotations

import re

from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "REASONS",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_MAX_DEPTH",
    "Value",
    "encode",
    "decode",
    "decode_prefix",
]

Value = int | bytes | list | dict

#: Every ``reason`` a decoder in this module can raise.
REASONS = (
    "truncated",  # input ended inside a value that more bytes could complete
    "too_long",  # value (or a string's length prefix) exceeds max_size
    "too_deep",  # lists/dicts nested deeper than max_depth
    "bad_integer",  # i...e not canonical decimal, or outside int64
    "bad_length",  # string length prefix not canonical decimal
    "bad_token",  # a byte that cannot start a value (or a stray 'e')
    "bad_key",  # dictionary key is not a byte string
    "missing_value",  # dictionary ends after a key, before its value
    "unsorted_keys",  # dictionary key smaller than the previous one
    "duplicate_key",  # dictionary key equal to the previous one
    "trailing_data",  # decode(): bytes left after the value
)

# 4 MiB: tracker responses are a few KB (a 200-peer compact response is
# ~1.3 KB, a full scrape of thousands of torrents is some hundreds of KB);
# .torrent metadata is larger, and callers decoding it pass their own bound
# (libtorrent's default for .torrent files is 10 MB).
DEFAULT_MAX_SIZE = 4 * 1024 * 1024

# 64: real structures nest at most ~5 deep (.torrent: dict > info > files list
# > file dict > path list). 64 is generous for extensions yet keeps the work
# and memory per container stack trivial.
DEFAULT_MAX_DEPTH = 64

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

# "-9223372036854775808" is 20 characters: longer cannot be an int64.
_MAX_INT_CHARS = 20
# A length prefix larger than 19 digits exceeds int64 and any real max_size.
_MAX_LEN_DIGITS = 19

_CANONICAL_INT = re.compile(rb"0|-?[1-9][0-9]*")
# Valid *prefixes* of a canonical integer body (used to tell "truncated" from
# "bad_integer" when the closing 'e' has not arrived).
_INT_PREFIX = re.compile(rb"|-|0|-?[1-9][0-9]{0,18}")
_CANONICAL_LEN = re.compile(rb"0|[1-9][0-9]*")

_I, _L, _D, _E, _COLON = 0x69, 0x6C, 0x64, 0x65, 0x3A
_DIGITS = frozenset(b"0123456789")


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def encode(value: object) -> bytes:
    """Encode *value* as canonical bencode."""
    out: list[bytes] = []
    _encode(value, out, 0)
    return b"".join(out)


def _encode(v: object, out: list, depth: int) -> None:
    t = type(v)
    if t is bytes:
        out.append(b"%d:" % len(v))  # type: ignore[arg-type]
        out.append(v)
    elif t is int:
        if not _INT64_MIN <= v <= _INT64_MAX:  # type: ignore[operator]
            raise LocalProtocolError(
                "integer outside int64 cannot be bencoded", reason="bad_integer"
            )
        out.append(b"i%de" % v)  # type: ignore[str-format]
    elif t is str:
        b = _utf8(v)  # type: ignore[arg-type]
        out.append(b"%d:" % len(b))
        out.append(b)
    elif t is list or t is tuple:
        if depth >= DEFAULT_MAX_DEPTH:
            raise LocalProtocolError("value nested too deeply", reason="too_deep")
        out.append(b"l")
        for item in v:  # type: ignore[attr-defined]
            _encode(item, out, depth + 1)
        out.append(b"e")
    elif t is dict:
        if depth >= DEFAULT_MAX_DEPTH:
            raise LocalProtocolError("value nested too deeply", reason="too_deep")
        items = []
        for k, item in v.items():  # type: ignore[attr-defined]
            tk = type(k)
            if tk is bytes:
                pass
            elif tk is str:
                k = _utf8(k)
            elif isinstance(k, (bytes, bytearray, memoryview)):
                k = bytes(k)
            else:
                raise LocalProtocolError(
                    f"dictionary key must be bytes or str, not {tk.__name__}",
                    reason="bad_key",
                )
            items.append((k, item))
        items.sort(key=_first)
        out.append(b"d")
        prev = None
        for k, item in items:
            if k == prev:
                raise LocalProtocolError(
                    f"two dictionary keys encode to {k!r}", reason="duplicate_key"
                )
            prev = k
            out.append(b"%d:" % len(k))
            out.append(k)
            _encode(item, out, depth + 1)
        out.append(b"e")
    # Slow path: subclasses and buffer types.
    elif isinstance(v, bool):
        raise LocalProtocolError("bool cannot be bencoded", reason="bad_type")
    elif isinstance(v, int):
        _encode(int(v), out, depth)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        _encode(bytes(v), out, depth)
    elif isinstance(v, str):
        _encode(str(v), out, depth)
    elif isinstance(v, (list, tuple)):
        _encode(list(v), out, depth)
    elif isinstance(v, dict):
        _encode(dict(v), out, depth)
    else:
        raise LocalProtocolError(
            f"{t.__name__} cannot be bencoded", reason="bad_type"
        )


def _first(pair: tuple) -> bytes:
    return pair[0]


def _utf8(s: str) -> bytes:
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise LocalProtocolError(f"string is not valid Unicode: {exc}", reason="bad_text") from None


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def decode(
    data: bytes,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Value:
    """Decode exactly one value that spans all of *data*.

    Returns ``int``, ``bytes``, ``list`` or ``dict[bytes, value]``.
    """
    data = _as_bytes(data)
    if len(data) > max_size:
        raise RemoteProtocolError(
            f"bencoded input of {len(data)} bytes exceeds {max_size}", reason="too_long"
        )
    value, end = decode_prefix(data, 0, max_size=max_size, max_depth=max_depth)
    if end != len(data):
        raise RemoteProtocolError(
            f"{len(data) - end} bytes after the bencoded value", reason="trailing_data"
        )
    return value


def decode_prefix(
    data: bytes,
    start: int = 0,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_size: int = DEFAULT_MAX_SIZE,
) -> tuple[Value, int]:
    """Decode one value beginning at ``data[start]``.

    Returns ``(value, end)`` where ``data[start:end]`` is the value's exact
    encoding; bytes after ``end`` are not looked at. Raises
    ``RemoteProtocolError("...", reason="truncated")`` if the data ends inside a
    value that more bytes could still complete.
    """
    data = _as_bytes(data)
    n = len(data)
    if not 0 <= start <= n:
        raise LocalProtocolError("start offset outside data", reason="bad_offset")
    if max_size < 0 or max_depth < 0:
        raise LocalProtocolError("limits must be non-negative", reason="bad_limit")
    # Nothing at or beyond `limit` may belong to the value.
    limit = start + max_size
    end = n if n < limit else limit

    # Each frame is [container, pending_key]; pending_key is only used by
    # dicts: None while a key is expected, else the key awaiting its value.
    # For dicts, last_keys[i] holds the previous key of stack[i].
    stack: list[list] = []
    last_keys: list = []
    pos = start

    while True:
        if pos >= end:
            _ran_out(end, n, limit)
        c = data[pos]
        if c == _E:
            if not stack:
                raise RemoteProtocolError("unexpected 'e'", reason="bad_token")
            frame = stack.pop()
            last_keys.pop()
            if frame[1] is not None:
                raise RemoteProtocolError(
                    "dictionary ends after a key without its value",
                    reason="missing_value",
                )
            value = frame[0]
            pos += 1
        elif c in _DIGITS:
            colon = data.find(b":", pos, min(end, pos + _MAX_LEN_DIGITS + 1))
            if colon < 0:
                digits = data[pos : min(end, pos + _MAX_LEN_DIGITS + 1)]
                if (
                    len(digits) <= _MAX_LEN_DIGITS
                    and _CANONICAL_LEN.fullmatch(digits)
                    and pos + len(digits) == end
                ):
                    _ran_out(end, n, limit)
                raise RemoteProtocolError(
                    "string length prefix is not canonical decimal", reason="bad_length"
                )
            digits = data[pos:colon]
            if not _CANONICAL_LEN.fullmatch(digits):
                raise RemoteProtocolError(
                    "string length prefix is not canonical decimal", reason="bad_length"
                )
            stop = colon + 1 + int(digits)
            if stop > limit:
                raise RemoteProtocolError(
                    f"string of {int(digits)} bytes exceeds the size limit",
                    reason="too_long",
                )
            if stop > n:
                raise RemoteProtocolError("input ends inside a string", reason="truncated")
            value = data[colon + 1 : stop]
            pos = stop
        elif c == _I:
            e = data.find(b"e", pos + 1, min(end, pos + 2 + _MAX_INT_CHARS))
            if e < 0:
                body = data[pos + 1 : min(end, pos + 2 + _MAX_INT_CHARS)]
                if (
                    pos + 1 + len(body) == end
                    and _INT_PREFIX.fullmatch(body)
                    and (len(body) < 19 or _INT64_MIN <= int(body) <= _INT64_MAX)
                ):
                    _ran_out(end, n, limit)
                raise RemoteProtocolError("integer is not canonical", reason="bad_integer")
            body = data[pos + 1 : e]
            if not _CANONICAL_INT.fullmatch(body):
                raise RemoteProtocolError("integer is not canonical", reason="bad_integer")
            value = int(body)
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise RemoteProtocolError("integer outside int64", reason="bad_integer")
            pos = e + 1
        elif c in (_L, _D):
            if len(stack) >= max_depth:
                raise RemoteProtocolError(
                    f"nesting deeper than {max_depth}", reason="too_deep"
                )
            stack.append([[] if c == _L else {}, None])
            last_keys.append(None)
            pos += 1
            continue
        else:
            raise RemoteProtocolError(
                f"byte {c:#04x} cannot start a value", reason="bad_token"
            )

        # Deliver `value` to its parent, or return it if it is the top level.
        if not stack:
            return value, pos
        frame = stack[-1]
        container = frame[0]
        if type(container) is list:
            container.append(value)
        elif frame[1] is None:
            if type(value) is not bytes:
                raise RemoteProtocolError(
                    "dictionary key is not a byte string", reason="bad_key"
                )
            prev = last_keys[-1]
            if prev is not None:
                if value == prev:
                    raise RemoteProtocolError(
                        "duplicate dictionary key", reason="duplicate_key"
                    )
                if value < prev:
                    raise RemoteProtocolError(
                        "dictionary keys not in sorted order", reason="unsorted_keys"
                    )
            last_keys[-1] = value
            frame[1] = value
        else:
            container[frame[1]] = value
            frame[1] = None


def _ran_out(end: int, n: int, limit: int) -> None:
    """Input stopped at `end` inside a value: over the size limit or truncated."""
    if end == limit and n > limit:
        raise RemoteProtocolError("value exceeds the size limit", reason="too_long")
    raise RemoteProtocolError("input ends inside a value", reason="truncated")


def _as_bytes(data: object) -> bytes:
    if type(data) is bytes:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise LocalProtocolError(
        f"bencode input must be bytes, not {type(data).__name__}", reason="bad_type"
    )
