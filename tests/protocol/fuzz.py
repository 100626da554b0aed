"""Shared pieces of the protocol tests' fuzz invariant.

Every decoder must, for any input, return a value or raise RemoteProtocolError
with a reason from its module's REASONS, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import strategies as st

from shoal.protocol.errors import RemoteProtocolError


@st.composite
def mutated(draw, base: st.SearchStrategy[bytes], inserts: tuple[bytes, ...] = ()) -> bytes:
    """A valid encoding from ``base`` with up to four flips, cuts, insertions or deletions.

    ``inserts`` adds format-specific fragments to the random bytes inserted
    (e.g. ``&`` and ``=`` for a query string), to reach deeper states.
    """
    raw = bytearray(draw(base))
    fragments = st.binary(min_size=1, max_size=4)
    if inserts:
        fragments = fragments | st.sampled_from(inserts)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, len(raw)))
        if op == "flip" and pos < len(raw):
            raw[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = draw(fragments)
        elif op == "delete" and pos < len(raw):
            del raw[pos]
    return bytes(raw)


def checkers(reasons: tuple[str, ...]) -> tuple[Callable, Callable]:
    """``(parses_or_remote, reason_of)`` for a module whose tokens are ``reasons``."""

    def parses_or_remote(fn, data, **kw):
        try:
            return fn(data, **kw)
        except RemoteProtocolError as exc:
            assert exc.reason in reasons, exc.reason
            return None

    def reason_of(fn, data, **kw) -> str:
        with pytest.raises(RemoteProtocolError) as info:
            fn(data, **kw)
        assert info.value.reason in reasons, info.value.reason
        return info.value.reason

    return parses_or_remote, reason_of
