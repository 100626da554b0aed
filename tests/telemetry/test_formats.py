"""The training mark the ClientApp writes for the telemetry daemon: round trip, and anything
else is a ValueError (the daemon logs it and goes on)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core.telemetry.formats import decode_training_mark, encode_training_mark


def test_a_training_mark_round_trips_in_progress_and_over():
    assert decode_training_mark(encode_training_mark(10.5, 42)) == (10.5, 42, None)
    assert decode_training_mark(encode_training_mark(10.5, 42, end=12.0)) == (10.5, 42, 12.0)


@pytest.mark.parametrize("data", [b"", b"\xff", b"[]", b"{}", b'{"start": 1}', b'{"start": "x", "pid": 1}',
                                  b'{"start": 5, "pid": 1, "end": 4}', b'{"start": 5, "pid": 0}',
                                  b'{"start": NaN, "pid": 1}', b" " * 5000])
def test_a_malformed_training_mark_is_a_value_error(data):
    with pytest.raises(ValueError):
        decode_training_mark(data)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_value_error(data):
    with contextlib.suppress(ValueError):
        decode_training_mark(data)
