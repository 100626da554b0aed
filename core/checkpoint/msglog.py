"""Partial message logging: the seed's sent table and receipt table (seed 003, III).

Theory of operation
-------------------
Every rank keeps two tables in its own address space; they are part of the rank's
checkpointed state (``snapshot``/``restore``), so a rollback restores them too.

Sent table, one entry per message sent: (ack status, seq, destination, message).
The rank numbers its sent messages sequentially (one counter per rank; the counter
is checkpointed as well, so a rank that re-executes after a rollback reuses the same
numbers for the same messages). Ack status:

    0  the message is sent                             (``on_send``)
    1  its acknowledgement has been received           (``on_ack``)
    2  sent during the previous checkpoint interval    (``on_checkpoint``: 1 -> 2)

Receipt table, one entry per message received: (ack status, seq, source).

    1  the message is received and the ack is sent     (``on_receive``)
    2  received during the previous checkpoint interval (``on_checkpoint``: 1 -> 2)

At a checkpoint the entries already at 2 are purged first, then 1 becomes 2, in both
tables. Because the Timeout rule keeps the ranks' checkpoint numbers within 1 of
each other, the log only ever holds the messages of the present and the previous
checkpoint interval.

A received message whose (source, seq) is already in the receipt table is dropped
(``on_receive`` returns False); that removes the *orphan* messages a re-executing
sender sends a second time. After a rollback every rank resends the messages of its
sent table with status 2 (the seed's rule) and, beyond the seed, those still at 0:
a message at 0 in the checkpointed table was in transit when the checkpoint was
taken and the sender will not execute that send again. Resending both removes the
*lost* messages; the receiver's receipt table drops the copies it already has. The
receiver acks every message, duplicates included, so a resent entry's ack moves
it from 0 to 1 (an entry at 1 or 2 stays where it is).

The Figure 3 walkthrough (messages m1-m4 and Tables 4-9) is replayed step by step
in tests/checkpoint/test_msglog.py and told in docs/checkpoint-core.md.

No I/O happens here: the library calls these methods around its own sends and
receives and decides when to checkpoint and roll back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import msgpack

SENT, ACKED, ARCHIVED = 0, 1, 2
"""Sent-table ack states (seed 003, III.A)."""
RECEIVED = 1
"""Receipt-table state 1 (received, ack sent); 2 is ARCHIVED as in the sent table."""

_SNAP_VERSION = 1


@dataclass(slots=True)
class SentEntry:
    status: int
    seq: int
    dest: int
    payload: bytes


@dataclass(slots=True)
class ReceiptEntry:
    status: int
    seq: int
    src: int


class Rollback(NamedTuple):
    """What ``after_rollback`` hands back to the library."""

    replay: list[SentEntry]  # resend these, in order, with their original seq numbers
    discarded_sent: int  # sent entries made after the checkpoint and now forgotten
    discarded_receipts: int  # receipt entries made after the checkpoint and now forgotten


def _payload(p) -> bytes:
    if not isinstance(p, bytes):
        raise TypeError(f"message slot must be bytes, not {type(p).__name__}")
    return p


class MessageLog:
    """One rank's sent and receipt tables."""

    def __init__(self, rank: int):
        self.rank = rank
        self.next_seq = 0
        self._sent: dict[int, SentEntry] = {}  # by seq, in send order
        self._receipts: dict[tuple[int, int], ReceiptEntry] = {}  # by (src, seq), in arrival order
        self.duplicates_dropped = 0  # orphan/duplicate messages refused by on_receive

    # -- the tables as the seed prints them ----------------------------------
    @property
    def sent(self) -> list[SentEntry]:
        return list(self._sent.values())

    @property
    def receipts(self) -> list[ReceiptEntry]:
        return list(self._receipts.values())

    @property
    def payload_bytes(self) -> int:
        """Bytes of message data held in the sent table (the log's memory cost)."""
        return sum(len(e.payload) for e in self._sent.values())

    def in_transit(self) -> int:
        """Messages this rank sent that are not acknowledged yet (status 0)."""
        return sum(1 for e in self._sent.values() if e.status == SENT)

    # -- events --------------------------------------------------------------
    def on_send(self, dest: int, payload: bytes) -> int:
        """Log a message about to be sent; returns its sequence number."""
        seq = self.next_seq
        self.next_seq += 1
        self._sent[seq] = SentEntry(SENT, seq, dest, bytes(payload))
        return seq

    def on_ack(self, dest: int, seq: int) -> bool:
        """An ack for (dest, seq) arrived: status 0 -> 1. False if nothing changed."""
        e = self._sent.get(seq)
        if e is None or e.dest != dest or e.status != SENT:
            return False
        e.status = ACKED
        return True

    def on_receive(self, src: int, seq: int) -> bool:
        """A message (src, seq) arrived. True: deliver it (now logged with status 1).
        False: it is already in the receipt table, drop it (ack it all the same)."""
        key = (src, seq)
        if key in self._receipts:
            self.duplicates_dropped += 1
            return False
        self._receipts[key] = ReceiptEntry(RECEIVED, seq, src)
        return True

    def on_checkpoint(self) -> None:
        """Taking an in-memory checkpoint: purge entries at 2, then 1 -> 2 (both tables)."""
        self._sent = {s: e for s, e in self._sent.items() if e.status != ARCHIVED}
        for e in self._sent.values():
            if e.status == ACKED:
                e.status = ARCHIVED
        self._receipts = {k: e for k, e in self._receipts.items() if e.status != ARCHIVED}
        for r in self._receipts.values():
            r.status = ARCHIVED

    def after_rollback(self, checkpointed: bytes) -> Rollback:
        """Roll the tables back to ``checkpointed`` (a ``snapshot()`` taken right after
        ``on_checkpoint``) and list the messages to resend: status 2 and status 0."""
        live_sent, live_receipts = set(self._sent), set(self._receipts)
        self.restore(checkpointed)
        replay = [e for e in self._sent.values() if e.status in (ARCHIVED, SENT)]
        return Rollback(
            replay,
            len(live_sent - set(self._sent)),
            len(live_receipts - set(self._receipts)),
        )

    # -- checkpointed state --------------------------------------------------
    def snapshot(self) -> bytes:
        return msgpack.packb(
            [
                _SNAP_VERSION,
                self.rank,
                self.next_seq,
                [[e.status, e.seq, e.dest, e.payload] for e in self._sent.values()],
                [[e.status, e.seq, e.src] for e in self._receipts.values()],
            ],
            use_bin_type=True,
        )

    def restore(self, data: bytes) -> None:
        """Replace the tables with a snapshot; raises ValueError if it is malformed."""
        try:
            version, rank, next_seq, sent, receipts = msgpack.unpackb(data, raw=False)
            if version != _SNAP_VERSION:
                raise ValueError(f"message log snapshot version {version} is not {_SNAP_VERSION}")
            new_sent = {int(seq): SentEntry(int(st), int(seq), int(d), _payload(p)) for st, seq, d, p in sent}
            new_rec = {(int(src), int(seq)): ReceiptEntry(int(st), int(seq), int(src)) for st, seq, src in receipts}
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise ValueError(f"bad message log snapshot: {exc}") from None
        if rank != self.rank:
            raise ValueError(f"message log snapshot is for rank {rank}, not {self.rank}")
        self.next_seq = int(next_seq)
        self._sent, self._receipts = new_sent, new_rec

    @classmethod
    def from_snapshot(cls, data: bytes) -> MessageLog:
        try:
            rank = int(msgpack.unpackb(data, raw=False)[1])
        except (ValueError, TypeError, IndexError, KeyError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError) as exc:
            raise ValueError(f"bad message log snapshot: {exc}") from None
        log = cls(rank)
        log.restore(data)
        return log
