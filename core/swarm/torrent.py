"""One torrent's decisions about received data, with no I/O: the torrent core.

The trio shell (``daemons/peer/torrent.py``) feeds events in and carries out
the actions that come back, in order. The core owns:

* **received blocks**: which are new (a duplicate, or a block of a piece we
  have, changes nothing), which other peers to send a Cancel (end-game), and
  when buffered blocks go to disk, in batches (:class:`Write`);
* **batch writes**: when the last write of a piece written in several
  batches has finished, the piece is read back and hashed (:class:`Verify`);
* **hash results**: a verified piece cancels its leftover requests and is
  announced (:class:`Verified`); a failed one is wanted again and blames the
  peers that sent its blocks (:class:`HashFailed`);
* **disk errors**: a piece whose write or read-back failed is released, every
  block wanted again, and nobody is blamed (:meth:`TorrentCore.write_failed`,
  :meth:`TorrentCore.piece_lost`); before, the picker went on counting its
  blocks as received and the piece never completed. New requests then pause
  (:meth:`TorrentCore.may_request`) for a back-off that doubles with each
  error after a pause, from ``disk_retry_first`` up to ``disk_retry_max``
  seconds, and starts over at a successful write: a disk that stays broken
  costs the swarm a few pieces a minute, not our whole download rate thrown
  away (:class:`PauseRequests` says when a pause starts);
* **peers leaving and requests timing out**: their blocks are wanted again
  (:class:`Refill`: top up the request queues).

Buffering: handing each 16 KiB block to a worker thread cost more CPU than
the transfer itself, so blocks wait in memory until their piece is complete
(or ``write_batch`` bytes of it have arrived, or ``write_buffer`` bytes wait
in all). Usually the batch is the whole piece: it is hashed from memory and
written only if it matches (``Write.whole``). Otherwise (a piece larger than
``write_batch``, or memory pressure) the piece is verified from disk by
whichever of its batch writes finishes last, never while another batch is
still on its way.

Nothing here reads a clock or does I/O: ``now`` is an argument, and peers are
opaque hashable values (links, web seeds).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from shoal.core.swarm.backoff import Backoff
from shoal.core.swarm.picker import PiecePicker

__all__ = ["Action", "Cancel", "HashFailed", "PauseRequests", "Refill", "TorrentCore", "Verified", "Verify", "Write",
           "WRITE_BATCH", "WRITE_BUFFER"]

Peer = Hashable

#: A piece's blocks go to disk once this much of it is buffered (or all of it).
WRITE_BATCH = 1 << 20
#: At most this many bytes wait in memory in all before they are written.
WRITE_BUFFER = 64 << 20
#: After a disk error no new block is requested for this long, doubling with
#: each error after a pause up to DISK_RETRY_MAX (a disk that is full or gone
#: is not fixed in a second; one that hiccuped loses a second).
DISK_RETRY_FIRST = 1.0
DISK_RETRY_MAX = 60.0


@dataclass(frozen=True, slots=True)
class Cancel:
    """Send ``peer`` a Cancel for this block: it is no longer wanted from it."""

    peer: Peer
    index: int
    begin: int
    length: int


@dataclass(frozen=True, slots=True)
class Write:
    """Write these blocks of piece ``index`` (then report :meth:`TorrentCore.write_done`).

    ``whole``: the blocks are the whole piece; hash them from memory and write
    only if they match (the report carries the result). Otherwise write them
    as they are and report ``ok=None``.
    """

    index: int
    blocks: tuple[tuple[int, bytes], ...]
    whole: bool


@dataclass(frozen=True, slots=True)
class Verify:
    """Every block of ``index`` is on disk: read it back, hash it, report :meth:`TorrentCore.piece_checked`."""

    index: int


@dataclass(frozen=True, slots=True)
class Verified:
    """Piece ``index`` passed its hash check: tell every peer (Have). ``complete``: it was the last one."""

    index: int
    complete: bool


@dataclass(frozen=True, slots=True)
class HashFailed:
    """Piece ``index`` failed its hash check; it is wanted again.

    Each of ``senders`` (the peers that sent blocks of it) gets an offence of
    ``points``: a sole sender is certainly guilty (2: close it), several are
    each suspect (1).
    """

    index: int
    senders: tuple[Peer, ...]
    points: int

    @property
    def certain(self) -> bool:
        return self.points >= 2


@dataclass(frozen=True, slots=True)
class Refill:
    """Blocks are wanted again: top up the peers' request queues."""


@dataclass(frozen=True, slots=True)
class PauseRequests:
    """A disk error started a pause: no new requests until ``until`` (say so once)."""

    until: float
    seconds: float


Action = Cancel | Write | Verify | Verified | HashFailed | Refill | PauseRequests

_REFILL = Refill()


class TorrentCore:
    """The per-torrent decisions on received data; see the module docstring.

    Every method returns the actions to carry out, in order. The picker is
    shared with the shell, which still asks it what to request.
    """

    def __init__(self, picker: PiecePicker, *, write_batch: int = WRITE_BATCH,
                 write_buffer: int = WRITE_BUFFER, disk_retry_first: float = DISK_RETRY_FIRST,
                 disk_retry_max: float = DISK_RETRY_MAX) -> None:
        if write_batch < 1 or write_buffer < 1:
            raise ValueError("write_batch and write_buffer must be positive")
        self.picker = picker
        self._disk_backoff = Backoff(disk_retry_first, disk_retry_max)
        self.paused_until = float("-inf")  # no new requests before this (a disk error)
        self.write_batch = write_batch
        self.write_buffer = write_buffer
        self.pending_bytes = 0  # bytes buffered, not yet handed out in a Write
        self._pending: dict[int, list[tuple[int, bytes]]] = {}  # piece -> buffered blocks
        self._pending_piece_bytes: dict[int, int] = {}  # piece -> bytes in _pending
        self._got: dict[int, set[int]] = {}  # piece -> offsets received since it was last wanted whole
        self._writing: dict[int, int] = {}  # piece -> Writes handed out and not yet reported

    # -- read-outs ---------------------------------------------------------------

    def may_request(self, now: float) -> bool:
        """New blocks may be requested at ``now`` (no pause after a disk error)."""
        return now >= self.paused_until

    def writing(self, index: int) -> int:
        """Writes of piece ``index`` handed out and not yet reported."""
        return self._writing.get(index, 0)

    def buffered(self, index: int) -> int:
        """Bytes of piece ``index`` waiting in memory."""
        return self._pending_piece_bytes.get(index, 0)

    # -- events ------------------------------------------------------------------

    def block_received(self, peer: Peer, index: int, begin: int, data: bytes) -> list[Action]:
        """``peer`` sent the block at (index, begin).

        A block still needed is kept (whoever sent it, requested or late), the
        other peers it was requested from are sent a Cancel, and a Write comes
        back once a batch is due. A duplicate, or a block of a piece we have,
        only forgets the request. Raises ValueError for a block that is not
        one of this torrent (index, offset or length): the caller checks them.
        """
        length = self.picker.block_length(index, begin)
        if len(data) != length:
            raise ValueError(f"block {index}:{begin} is {len(data)} bytes, not {length}")
        if self._known(index, begin):
            self.picker.block_received(peer, index, begin)  # forgets our request, if any
            return []
        actions: list[Action] = [Cancel(other, index, begin, length)
                                 for other in self.picker.block_received(peer, index, begin)]
        self._buffer(index, begin, data, actions)
        return actions

    def buffer_block(self, index: int, begin: int, data: bytes) -> list[Action]:
        """A block the caller has already reported to the picker (``picker.block_received``).

        For block sources that do their own request bookkeeping (web seeds);
        the same as :meth:`block_received` after the picker's part.
        """
        length = self.picker.block_length(index, begin)
        if len(data) != length:
            raise ValueError(f"block {index}:{begin} is {len(data)} bytes, not {length}")
        actions: list[Action] = []
        if not self._known(index, begin):
            self._buffer(index, begin, data, actions)
        return actions

    def write_done(self, index: int, ok: bool | None) -> list[Action]:
        """A Write of ``index`` finished: ``ok`` is the hash result of a whole write, None otherwise."""
        last = self._written(index)
        self._disk_backoff.succeeded()
        if ok is not None:
            return self.piece_checked(index, ok)
        if not last or index in self._pending or self.picker.have(index) \
                or not self.picker.all_blocks_received(index):
            return []
        return [Verify(index)]

    def write_failed(self, index: int, now: float) -> list[Action]:
        """A Write of ``index`` failed at ``now`` with a disk error: the piece is fetched again, after a pause."""
        self._written(index)
        return self.piece_lost(index, now)

    def piece_checked(self, index: int, ok: bool) -> list[Action]:
        """The hash check of piece ``index`` (a whole Write's, or a Verify's) gave ``ok``."""
        picker = self.picker
        if picker.have(index):
            return []
        self._got.pop(index, None)
        if not ok:
            self._drop_pending(index)
            senders = tuple(picker.piece_failed(index))
            return [HashFailed(index, senders, 2 if len(senders) == 1 else 1), _REFILL]
        actions: list[Action] = [Cancel(peer, b.index, b.begin, b.length) for peer, b in picker.we_have(index)]
        actions.append(Verified(index, picker.complete))
        return actions

    def piece_lost(self, index: int, now: float) -> list[Action]:
        """What was written of piece ``index`` cannot be trusted (a disk error at ``now``).

        Every block is wanted again, and nobody is blamed: the disk failed,
        not the peers. Its buffered blocks are dropped too (they will be
        fetched again with the rest). An error after the last pause ended
        starts a longer one (errors during a pause are writes of blocks
        already on their way, and change nothing).
        """
        actions: list[Action] = []
        if now >= self.paused_until:
            delay = self._disk_backoff.failed()
            self.paused_until = now + delay
            actions.append(PauseRequests(self.paused_until, delay))
        if self.picker.have(index):
            return actions
        self._drop_pending(index)
        self._got.pop(index, None)
        self.picker.piece_failed(index)
        actions.append(_REFILL)
        return actions

    def peer_gone(self, peer: Peer) -> list[Action]:
        """``peer`` disconnected: its requests are released (the blocks it sent are kept)."""
        return [_REFILL] if self.picker.peer_gone(peer) else []

    def requests_failed(self, peer: Peer, blocks: Iterable[tuple[int, int]]) -> list[Action]:
        """``peer`` rejected these (index, begin) requests, or choked us with them outstanding.

        The blocks are wanted again (from anyone).
        """
        failed = False
        for index, begin in blocks:
            self.picker.request_failed(peer, index, begin)
            failed = True
        return [_REFILL] if failed else []

    def expired(self, now: float, timeout: float) -> list[Action]:
        """Requests older than ``timeout`` at ``now``: cancel each with its peer; the blocks go to others."""
        actions: list[Action] = [Cancel(peer, b.index, b.begin, b.length)
                                 for peer, b in self.picker.expired(now, timeout)]
        if actions:
            actions.append(_REFILL)
        return actions

    # -- internals ---------------------------------------------------------------

    def _known(self, index: int, begin: int) -> bool:
        """The block changes nothing: we have its piece, or it came already."""
        if self.picker.have(index):
            return True
        got = self._got.get(index)
        return got is not None and begin in got

    def _buffer(self, index: int, begin: int, data: bytes, actions: list[Action]) -> None:
        got = self._got.get(index)
        if got is None:
            got = self._got[index] = set()
        got.add(begin)
        pending = self._pending.get(index)
        if pending is None:
            pending = self._pending[index] = []
        pending.append((begin, data))
        n = len(data)
        self.pending_bytes += n
        piece_bytes = self._pending_piece_bytes[index] = self._pending_piece_bytes.get(index, 0) + n
        complete = self.picker.all_blocks_received(index)
        if not complete and piece_bytes < self.write_batch and self.pending_bytes < self.write_buffer:
            return
        batch = self._pending.pop(index)
        del self._pending_piece_bytes[index]
        self.pending_bytes -= piece_bytes
        whole = complete and index not in self._writing and piece_bytes == self.picker.piece_size(index)
        self._writing[index] = self._writing.get(index, 0) + 1
        actions.append(Write(index, tuple(batch), whole))

    def _drop_pending(self, index: int) -> None:
        if self._pending.pop(index, None) is not None:
            self.pending_bytes -= self._pending_piece_bytes.pop(index)

    def _written(self, index: int) -> bool:
        """One Write of ``index`` ended; True if it was the last one outstanding."""
        n = self._writing[index] - 1
        if n:
            self._writing[index] = n
            return False
        del self._writing[index]
        return True
