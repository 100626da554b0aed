"""A rank's messages: the inbox, the partial message log, acks and replay.

``send`` numbers each message (the sent table's seq, see
:class:`shoal.core.checkpoint.msglog.MessageLog`), logs it and delivers it to
the destination's own RPC server (``msg``), which queues it per source.
``recv`` takes the next message from that source and records its receipt.
After a rank commits a checkpoint it tells each source how far it has consumed
(``ack``); the source marks those sent-table entries acknowledged, and the
log's rule then forgets them safely. After a rollback the rank resends, from
its sent table, what its peers had not consumed (:meth:`Mailbox.replay`); a
message at or below the receiver's consumed sequence number (an orphan) is
dropped on arrival. Messages of an epoch older than the rank's are dropped too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from shoal.core.checkpoint.msglog import SENT, MessageLog
from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.rpc import RpcClient, RpcConnectionError, RpcError, connect_tcp, rpc_method
from shoal.protocol.checkpoint import Ack, Msg
from shoal.protocol.contract import BadParams

MAX_INBOX = 100_000  # queued messages per source before a sender is refused


class Mailbox:
    """The messages of one rank: its inbox, its message log and its peer connections."""

    def __init__(self, rank: int, n: int, *, epoch: Callable[[], int], token: bytes | None, max_frame: int,
                 stats: dict[str, Any]) -> None:
        self.rank, self.n = rank, n
        self._epoch = epoch  # the group's epoch (held by the coordinator link)
        self.token, self.max_frame = token, max_frame
        self.stats = stats  # the rank's figures: "replayed", "dropped"
        self.msglog = MessageLog(rank)
        self.consumed = [-1] * n  # per source, the last seq consumed by recv
        self.arrived = [-1] * n  # per source, the last seq queued (older ones are orphans)
        self.inbox: list[deque[tuple[int, bytes]]] = [deque() for _ in range(n)]
        self.arrival = trio.Event()
        self.tx = self.rx = 0  # messages sent/received this epoch (blocking rounds)
        self.addrs: list[Any] = [None] * n  # the peers' servers, from the group's view
        self.peers: dict[int, RpcClient] = {}

    # -- the app's calls -----------------------------------------------------------
    async def send(self, dest: int, data: bytes | np.ndarray) -> None:
        if not 0 <= dest < self.n or dest == self.rank:
            raise ValueError(f"cannot send to rank {dest}")
        payload = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        seq = self.msglog.on_send(dest, payload)
        await self.transmit(dest, seq, payload)

    async def recv(self, src: int) -> bytes:
        if not 0 <= src < self.n or src == self.rank:
            raise ValueError(f"cannot receive from rank {src}")
        while not self.inbox[src]:
            await self.arrival.wait()
        seq, data = self.inbox[src].popleft()
        self.consumed[src] = seq
        self.msglog.on_receive(src, seq)
        return data

    # -- checkpoints and rollbacks ---------------------------------------------------
    def checkpoint(self) -> tuple[Any, list[int]]:
        """The log moves to its next interval; its snapshot and the consumed table, for the image."""
        self.msglog.on_checkpoint()
        return self.msglog.snapshot(), list(self.consumed)

    def log_figures(self) -> tuple[int, int]:
        """The log's payload bytes and entries (reported at a commit)."""
        return self.msglog.payload_bytes, len(self.msglog.sent) + len(self.msglog.receipts)

    def reset(self, tasks: trio.Nursery) -> None:
        """A rollback begins: forget what is queued and the connections of the old epoch."""
        for q in self.inbox:
            q.clear()
        for c in self.peers.values():
            tasks.start_soon(c.aclose)
        self.peers.clear()
        self.tx = self.rx = 0

    def restore(self, logsnap: Any | None, consumed: list[int] | None) -> None:
        """The log and consumed table of the image rolled back to (None: no checkpoint yet)."""
        if logsnap is None or consumed is None:
            self.msglog = MessageLog(self.rank)
            self.consumed = [-1] * self.n
        else:
            self.msglog = MessageLog.from_snapshot(logsnap)
            self.consumed = list(consumed)
        self.arrived = list(self.consumed)

    async def replay(self, consumed: list[list[int]]) -> None:
        """Resend what the peers had not consumed (``consumed[dest][src]``), in order."""
        for e in sorted(self.msglog.sent, key=lambda e: e.seq):
            if e.seq > consumed[e.dest][self.rank]:
                await self.transmit(e.dest, e.seq, e.payload)
                self.stats["replayed"] += 1

    async def send_acks(self, consumed: list[int]) -> None:
        """Tell each source how far our committed image has consumed its messages."""
        epoch = self._epoch()
        for src, seq in enumerate(consumed):
            if src == self.rank or seq < 0:
                continue
            try:
                client = await self.peer(src)
                await client.call("ack", Ack(src=self.rank, upto=seq, epoch=epoch).encode(), timeout=10.0)
            except (RpcError, OSError):
                pass  # the peer is gone; its replacement learns it at resume

    # -- connections to the peers ----------------------------------------------------
    def set_addrs(self, addrs: list[Any], tasks: trio.Nursery) -> None:
        """The peers' addresses from a view; a moved peer's old connection is closed."""
        for i, a in enumerate(addrs):
            if a is not None and self.addrs[i] != a:
                self.addrs[i] = a
                old = self.peers.pop(i, None)
                if old is not None:
                    tasks.start_soon(old.aclose)

    async def peer(self, dest: int) -> RpcClient:
        c = self.peers.get(dest)
        if c is None or c._broken is not None:  # noqa: SLF001 - reconnect a broken client
            addr = self.addrs[dest]
            if addr is None:
                raise RpcConnectionError("connection_lost", f"no address for rank {dest} yet")
            c = await connect_tcp(ListenAddr(*addr), token=self.token, max_frame=self.max_frame, timeout=5.0)
            self.peers[dest] = c
        return c

    async def transmit(self, dest: int, seq: int, payload: bytes) -> None:
        while True:
            try:
                client = await self.peer(dest)
                await client.call("msg", Msg(src=self.rank, seq=seq, epoch=self._epoch(), data=payload).encode())
                self.tx += 1
                return
            except (RpcError, OSError) as exc:
                if isinstance(exc, RpcError) and exc.code == "busy":
                    pass
                # The peer is gone or not there yet: a rollback will cancel us, or it comes back.
                await trio.sleep(0.02)

    async def aclose(self) -> None:
        for c in self.peers.values():
            await c.aclose()

    # -- the rank's server: messages and acks from the peers ------------------------
    @rpc_method("msg", Msg)
    async def _on_msg(self, p: Msg) -> bool:
        if p.src >= self.n or p.src == self.rank:
            raise BadParams(f"src: no rank {p.src} sends to rank {self.rank} of {self.n}")
        if p.epoch < self._epoch():
            return False  # from before a rollback: the sender will resend what is needed
        self.rx += 1
        if p.seq <= self.arrived[p.src]:
            self.stats["dropped"] += 1  # an orphan (or duplicate): consumed before our checkpoint
            return False
        if len(self.inbox[p.src]) >= MAX_INBOX:
            raise RpcError("busy", "inbox full")
        self.arrived[p.src] = p.seq
        self.inbox[p.src].append((p.seq, p.data))
        ev, self.arrival = self.arrival, trio.Event()
        ev.set()
        return True

    @rpc_method("ack", Ack)
    async def _on_ack(self, p: Ack) -> bool:
        for e in self.msglog.sent:
            if e.dest == p.src and e.seq <= p.upto and e.status == SENT:
                self.msglog.on_ack(p.src, e.seq)
        return True
