"""Tests for shoal.protocol.nfqueue: the netlink messages the lab's delay line sends and reads."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol import nfqueue
from shoal.protocol.errors import LocalProtocolError

from .fuzz import checkers, mutated

parses_or_remote, reason_of = checkers(nfqueue.REASONS)


def packet_message(queue: int, packet_id: int, *, extra_attrs: bytes = b"") -> bytes:
    """What the kernel sends for a queued packet in COPY_META mode (NFQA_PACKET_HDR, then others)."""
    hdr = struct.pack("!IHB", packet_id, 0x0800, 1) + b"\0"  # id, hw_protocol, hook, padding
    attrs = extra_attrs + struct.pack("=HH", 4 + 7, nfqueue.NFQA_PACKET_HDR) + hdr
    body = struct.pack("=BB", 2, 0) + struct.pack("!H", queue) + attrs
    return struct.pack("=IHHII", 16 + len(body), (3 << 8) | 0, 0, 0, 0) + body


def ack(seq: int, error: int) -> bytes:
    body = struct.pack("=i", error) + b"\0" * 16
    return struct.pack("=IHHII", 16 + len(body), 2, 0, seq, 0) + body


def test_verdict_batch_golden_bytes():
    # nlmsghdr(len 32, type 0x303, NLM_F_REQUEST), nfgenmsg(AF_UNSPEC, v0, queue 7 big-endian),
    # NFQA_VERDICT_HDR(len 12): verdict ACCEPT, id 0x01020304, both big-endian
    assert nfqueue.verdict_batch(7, 0x01020304, nfqueue.ACCEPT) == (
        struct.pack("=IHHII", 32, 0x0303, 1, 0, 0) + b"\x00\x00\x00\x07"
        + struct.pack("=HH", 12, 2) + b"\x00\x00\x00\x01\x01\x02\x03\x04")


def test_bind_asks_for_metadata_only_and_whole_gso_packets():
    raw = nfqueue.bind(3, maxlen=5000, seq=10)
    first_len = struct.unpack_from("=I", raw)[0]
    config = raw[first_len:]
    # the second message carries COPY_META (copy_range 0) and the GSO flag in mask and flags
    assert struct.pack("=HH", 9, nfqueue.NFQA_CFG_PARAMS) + struct.pack("!IB", 0, nfqueue.NFQNL_COPY_META) in config
    assert struct.pack("=HH", 8, nfqueue.NFQA_CFG_FLAGS) + struct.pack("!I", nfqueue.NFQA_CFG_F_GSO) in config
    assert struct.pack("=HH", 8, nfqueue.NFQA_CFG_QUEUE_MAXLEN) + struct.pack("!I", 5000) in config
    # both ask for an ack, so the delay line knows the bind held
    assert struct.unpack_from("=H", raw, 6)[0] & nfqueue.NLM_F_ACK


def test_queue_number_out_of_range_is_our_bug():
    with pytest.raises(LocalProtocolError):
        nfqueue.verdict(70000, 1, nfqueue.ACCEPT)


def test_decodes_packets_and_acks_in_one_datagram():
    data = packet_message(5, 99) + ack(4, -1) + packet_message(0, 100, extra_attrs=struct.pack("=HH", 8, 9) + b"abcd")
    assert nfqueue.Decoder().feed(data) == [nfqueue.Packet(5, 99), nfqueue.Ack(4, -1), nfqueue.Packet(0, 100)]


@pytest.mark.parametrize("cut", [3, 15, 17, 19, 22, 26])
def test_truncated_messages_are_the_kernels_fault_not_a_crash(cut):
    data = packet_message(1, 2)[:cut]
    assert parses_or_remote(nfqueue.Decoder().feed, data) is None


def test_packet_without_header_is_refused():
    body = struct.pack("=BB", 2, 0) + struct.pack("!H", 1) + struct.pack("=HH", 8, 9) + b"abcd"
    data = struct.pack("=IHHII", 16 + len(body), 3 << 8, 0, 0, 0) + body
    assert reason_of(nfqueue.Decoder().feed, data) == "no_packet_header"


packets = st.builds(packet_message, st.integers(0, 65535), st.integers(0, 2**32 - 1))


@settings(max_examples=300, deadline=None)
@given(mutated(packets))
def test_fuzz_parses_or_raises_remote_protocol_error(data):
    parses_or_remote(nfqueue.Decoder().feed, data)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 2**32 - 1)), min_size=1, max_size=20))
def test_round_trip_any_sequence_of_packets(items):
    data = b"".join(packet_message(q, i) for q, i in items)
    assert nfqueue.Decoder().feed(data) == [nfqueue.Packet(q, i) for q, i in items]
