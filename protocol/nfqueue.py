"""nfnetlink_queue: the kernel's "hand me each packet, I'll say when it may go" protocol, sans-IO.

The lab's delay line (:mod:`shoal.lab.delayline`) holds packets for a link's
delay. This kernel has no ``sch_netem`` (``CONFIG_NET_SCH_NETEM`` is not set),
so delay, jitter and loss cannot be a qdisc; instead an iptables ``NFQUEUE``
rule queues a host's incoming packets to user space, which gives each one its
verdict (accept or drop) once its delay has passed.

Theory of operation
-------------------
Messages are netlink messages (``struct nlmsghdr``, host byte order) of the
``NFNL_SUBSYS_QUEUE`` subsystem, each followed by a ``struct nfgenmsg`` whose
``res_id`` (big-endian) is the queue number, then netlink attributes. Only
the metadata of each packet is asked for (``NFQNL_COPY_META``): the delay line
never reads payloads, so a 64 KiB GSO packet costs the same as an ACK.

:func:`bind`, :func:`verdict` and :func:`verdict_batch` build the requests.
:class:`Decoder` takes whatever ``recv`` returned and yields :class:`Packet`
and :class:`Ack` events; anything malformed raises ``RemoteProtocolError``.
A batch verdict applies to every queued packet whose id is at most the given
one, which is why the delay line keeps each queue in arrival order.

Constants are from ``linux/netfilter/nfnetlink_queue.h``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["Ack", "Decoder", "Packet", "bind", "unbind", "verdict", "verdict_batch", "ACCEPT", "DROP", "REASONS"]

#: The ``reason`` of every RemoteProtocolError the decoder raises.
REASONS = ("too_long", "truncated", "bad_length", "no_packet_header")

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4  # hand GSO packets over whole: no segmentation for user space

DROP = 0
ACCEPT = 1

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
# A recv of one netlink datagram is at most what the socket buffer holds; a
# message longer than 64 KiB is not one the kernel sends for COPY_META.
MAX_MESSAGE = 1 << 16


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attrs: bytes, *, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    if not 0 <= queue < 65536:
        raise LocalProtocolError(f"queue number {queue} out of range")
    body = _NFGENMSG.pack(0, 0, struct.unpack("=H", struct.pack("!H", queue))[0]) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0) + body


def bind(queue: int, *, maxlen: int, seq: int = 0) -> bytes:
    """Bind ``queue`` to this socket, metadata only, GSO packets whole, at most ``maxlen`` queued."""
    return (
        _message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)),
                 flags=NLM_F_REQUEST | NLM_F_ACK, seq=seq)
        + _message(NFQNL_MSG_CONFIG, queue,
                   _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
                   + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
                   + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO))
                   + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO)),
                   flags=NLM_F_REQUEST | NLM_F_ACK, seq=seq + 1)
    )


def unbind(queue: int) -> bytes:
    return _message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0)))


def verdict(queue: int, packet_id: int, decision: int) -> bytes:
    """The verdict on one packet."""
    return _message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", decision, packet_id)))


def verdict_batch(queue: int, last_id: int, decision: int) -> bytes:
    """The verdict on every packet of ``queue`` still queued whose id is at most ``last_id``."""
    return _message(NFQNL_MSG_VERDICT_BATCH, queue,
                    _attr(NFQA_VERDICT_HDR, struct.pack("!II", decision, last_id)))


@dataclass(frozen=True, slots=True)
class Packet:
    queue: int
    packet_id: int


@dataclass(frozen=True, slots=True)
class Ack:
    """The kernel's answer to a request sent with NLM_F_ACK: ``error`` is 0 or a negative errno."""

    seq: int
    error: int


class Decoder:
    """Netlink datagrams in, :class:`Packet` and :class:`Ack` events out."""

    def feed(self, data: bytes) -> list[Packet | Ack]:
        if len(data) > MAX_MESSAGE:
            raise RemoteProtocolError(f"netlink datagram of {len(data)} bytes", reason="too_long")
        events: list[Packet | Ack] = []
        off = 0
        while off < len(data):
            if len(data) - off < _NLMSGHDR.size:
                raise RemoteProtocolError("truncated netlink header", reason="truncated")
            length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
            if length < _NLMSGHDR.size or off + length > len(data):
                raise RemoteProtocolError(f"netlink message length {length} out of bounds", reason="bad_length")
            if kind == NLMSG_ERROR:
                if length < _NLMSGHDR.size + 4:
                    raise RemoteProtocolError("truncated netlink error", reason="truncated")
                (error,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
                events.append(Ack(seq, error))
            elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                events.append(self._packet(data, off, length))
            off += (length + 3) & ~3
        return events

    @staticmethod
    def _packet(data: bytes, off: int, length: int) -> Packet:
        start = off + _NLMSGHDR.size
        if length < _NLMSGHDR.size + _NFGENMSG.size:
            raise RemoteProtocolError("truncated nfgenmsg", reason="truncated")
        queue = struct.unpack_from("!H", data, start + 2)[0]
        a = start + _NFGENMSG.size
        end = off + length
        while a + _NLATTR.size <= end:
            alen, akind = _NLATTR.unpack_from(data, a)
            if alen < _NLATTR.size or a + alen > end:
                raise RemoteProtocolError(f"netlink attribute length {alen} out of bounds", reason="bad_length")
            if akind & 0x3FFF == NFQA_PACKET_HDR:
                if alen < _NLATTR.size + 4:
                    raise RemoteProtocolError("truncated packet header", reason="truncated")
                return Packet(queue, struct.unpack_from("!I", data, a + _NLATTR.size)[0])
            a += (alen + 3) & ~3
        raise RemoteProtocolError("queued packet without NFQA_PACKET_HDR", reason="no_packet_header")
