"""The application library: a rank of a checkpointed group (``Rank``).

Theory of operation
-------------------
An application of n ranks runs one :class:`Rank` per process (or per trio
task, as the tests do). Before ``run`` it registers its state: numpy arrays,
bytearrays or writable mmaps, always updated in place. ``run(main)`` joins the
group at the coordinator, takes checkpoint 0, waits for every rank to have
one, and calls ``await main(rank)``. ``main`` must be written to *resume from
the registered state*: after a rollback it is called again, from the top,
with the registered buffers holding the checkpoint. It talks to other ranks
only with ``send(dest, data)`` and ``recv(src)`` and calls ``safe_point()``
between steps; a checkpoint is only ever taken there. Ranks must be
deterministic given the messages they receive (``recv`` names its source).

The checkpoint image. The registered buffers are laid out at block-aligned
offsets, followed by the library's own state: the step counter, the message
log (``msglog.MessageLog``: the seed's sent and receipt tables) and, per
source, the sequence number of the last message consumed. The rank keeps its
last committed image in its own memory (``_ckpt``); a checkpoint sends the
coordinator ``changed_blocks(old, new)``, XOR deltas of the blocks that
changed, and applies the same deltas to its own copy once the coordinator has
committed them, so the image and the parity never disagree.

When. Enhanced mode (the seed's scheme): when the timer (``interval``
seconds, the seed's Timeout) has fired, ``safe_point`` asks for a grant; a
held request is retried when the coordinator releases it (the watch says so).
Granted, the rank captures its deltas (that pause is O) and ships them in the
background while ``main`` goes on (until the commit: L). Blocking mode
(Plank): a round is proposed, every rank freezes at the same step, and stays
frozen until every rank has committed (see shoal.daemons.checkpoint.coordinator).

Messages. ``send`` numbers each message (the sent table's seq), logs it and
delivers it to the destination's own RPC server, which queues it per source.
``recv`` takes the next message from that source and records its receipt.
After a rank commits a checkpoint it tells each source how far it has
consumed; the source marks those sent-table entries acknowledged (status 1),
and the seed's rule (1 -> 2 at the next checkpoint, 2 purged at the one after)
then forgets them safely: a message is only acknowledged once a checkpoint of
its receiver covers it, so no rollback can ever need it again.

Rollback. When any rank fails, the coordinator's watch reports a new epoch:
``main`` is cancelled, a checkpoint being shipped is let finish (or fail), the
registered buffers and the log are restored from the image, and the rank
reports, per source, the last sequence number it had consumed. When every
rank (the replacement included) is ready, each resends from its sent table
the messages its peers had not consumed (the *lost* messages) and ``main``
runs again. A re-executed send of a message the receiver had already consumed
before its checkpoint (an *orphan*) has a sequence number at or below the
receiver's consumed one and is dropped. A replacement rank reads its image,
range by range, from the coordinator, which decodes it from the survivors'
images and the parity.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import msgpack
import numpy as np
import trio

from shoal.core.checkpoint.msglog import SENT, MessageLog
from shoal.core.checkpoint.parity import changed_blocks, xor_into
from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.rpc import (
    RpcClient,
    RpcConnectionError,
    RpcError,
    RpcServer,
    connect_tcp,
    handlers_of,
    rpc_method,
)
from shoal.protocol.checkpoint import Ack, CkptRead, Msg
from shoal.protocol.contract import BadParams

log = logging.getLogger("shoal.checkpoint.rank")

META_VERSION = 1
MAX_INBOX = 100_000  # queued messages per source before a sender is refused
DEFAULT_MAX_FRAME = 8 << 20
#: A rank's own RPC server listens on loopback, on a port of the kernel's choosing, by default.
ANY_LOOPBACK_PORT = ListenAddr("127.0.0.1", 0)


class GroupFailed(Exception):
    """More ranks failed than the parity survives; the group cannot recover."""


class _Rollback(Exception):
    pass


T = TypeVar("T")


def _open(value: T | None) -> T:
    """What ``run`` has set up by now (a connection, the nursery, the address)."""
    assert value is not None, "used before run() set it up"
    return value


def _buffer_view(buf: Any) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous or not buf.flags.writeable:
            raise ValueError("registered arrays must be C-contiguous and writable")
        return buf.reshape(-1).view(np.uint8)
    view = np.frombuffer(buf, dtype=np.uint8)
    if not view.flags.writeable:
        raise ValueError("registered buffers must be writable (bytearray, mmap opened for writing)")
    return view


class Rank:
    """One rank of a checkpoint group; see the module docstring."""

    def __init__(
        self,
        coordinator: ListenAddr,
        group: str,
        rank: int,
        n: int,
        *,
        mode: str = "enhanced",
        interval: float = 1.0,
        block_size: int = 65536,
        parity_shards: int = 1,
        token: bytes | None = None,
        listen: ListenAddr = ANY_LOOPBACK_PORT,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        if not 0 <= rank < n:
            raise ValueError(f"rank {rank} is outside 0..{n - 1}")
        if mode not in ("enhanced", "blocking"):
            raise ValueError("mode is 'enhanced' or 'blocking'")
        self.coordinator, self.group, self.rank, self.n = coordinator, group, rank, n
        self.mode, self.interval, self.block_size, self.m = mode, interval, block_size, parity_shards
        self.token, self.listen, self.max_frame = token, listen, max_frame
        self.state: dict[str, Any] = {}
        self.params: dict[str, Any] = {}  # the app's own settings (not checkpointed)
        self._layout: list[tuple[str, np.ndarray, int]] = []
        self._arrays_end = 0
        self._ckpt = np.zeros(0, dtype=np.uint8)
        self._ckpt_size = 0
        self.number = -1  # last committed checkpoint
        self.step = 0
        self.msglog = MessageLog(rank)
        self.consumed = [-1] * n
        self._arrived = [-1] * n
        self._inbox: list[deque[tuple[int, bytes]]] = [deque() for _ in range(n)]
        self._arrival = trio.Event()
        self._tx = self._rx = 0  # messages sent/received this epoch (blocking rounds)
        self.epoch = 0
        self.key = b""
        self.chunk = max_frame // 2
        self.view: dict[str, Any] = {"phase": "starting", "epoch": 0, "taking": [], "round": [False, None]}
        self._version = -1
        self._view_changed = trio.Event()
        self._addrs: list[Any] = [None] * n
        self._coord: RpcClient | None = None
        # Long polls get connections of their own: RpcClient hands a response to
        # its caller through a shared read lock, so a short call answered while a
        # long poll holds that lock could wait for the poll's own answer.
        self._watch_client: RpcClient | None = None
        self._attach_client: RpcClient | None = None
        self._coord_ok = trio.Event()
        self._joined = trio.Event()  # a session key is held (heartbeats may flow)
        self._peers: dict[int, RpcClient] = {}
        self._app_scope: trio.CancelScope | None = None
        self._need_rollback = False
        self._recovering = False
        self._failed = False
        self._shipping = False
        self._shipped = trio.Event()
        self._shipped.set()
        self._held = False
        self._due = math.inf
        self._nursery: trio.Nursery | None = None
        self.addr: ListenAddr | None = None
        # what happened, for tests, the demo and the benchmarks
        self.stats: dict[str, Any] = {"checkpoints": 0, "overhead": [], "rollbacks": 0, "replayed": 0,
                                      "dropped": 0, "recovered_bytes": 0, "recovery_seconds": None}

    @property
    def _tasks(self) -> trio.Nursery:
        """The nursery of ``run`` (its background tasks)."""
        return _open(self._nursery)

    @property
    def _coordinator(self) -> RpcClient:
        """The connection for short calls to the coordinator (held once joined)."""
        return _open(self._coord)

    # -- registration -----------------------------------------------------------
    def register(self, name: str, buf: Any) -> Any:
        """Register a buffer (updated in place by the app); returns it."""
        if self._nursery is not None:
            raise RuntimeError("register every buffer before run()")
        if name in self.state:
            raise ValueError(f"{name!r} is already registered")
        view = _buffer_view(buf)
        self._layout.append((name, view, self._arrays_end))
        self._arrays_end += -(-view.size // self.block_size) * self.block_size
        self.state[name] = buf
        return buf

    # -- the app's calls -----------------------------------------------------------
    async def send(self, dest: int, data: bytes | np.ndarray) -> None:
        """Send ``data`` to rank ``dest`` (logged in the sent table)."""
        if not 0 <= dest < self.n or dest == self.rank:
            raise ValueError(f"cannot send to rank {dest}")
        payload = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        seq = self.msglog.on_send(dest, payload)
        await self._transmit(dest, seq, payload)

    async def recv(self, src: int) -> bytes:
        """The next message from rank ``src``."""
        if not 0 <= src < self.n or src == self.rank:
            raise ValueError(f"cannot receive from rank {src}")
        while not self._inbox[src]:
            await self._arrival.wait()
        seq, data = self._inbox[src].popleft()
        self.consumed[src] = seq
        self.msglog.on_receive(src, seq)
        return data

    async def safe_point(self) -> None:
        """End of a step: the registered state is consistent; a checkpoint may be taken."""
        self.step += 1
        await trio.lowlevel.checkpoint()
        if not self._coord_ok.is_set() or self.view.get("phase") != "running":
            return
        if self.mode == "enhanced":
            await self._enhanced()
        else:
            await self._blocking()

    # -- running ---------------------------------------------------------------
    async def run(self, main: Callable[[Rank], Awaitable[Any]]) -> Any:
        """Join, checkpoint, run ``main`` (again after every rollback); return its result."""
        server = RpcServer(handlers_of(self), token=self.token, max_frame=self.max_frame,
                           name=f"shoal-rank-{self.group}")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.addr = await nursery.start(partial(server.serve_tcp, self.listen))
                nursery.start_soon(self._heartbeat)
                await self._join()
                nursery.start_soon(self._watcher)
                result = await self._loop(main)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps what _loop raises; GroupFailed is the app's to catch.
            failed, rest = group.split(GroupFailed)
            if failed is not None and rest is None:
                first: BaseException = failed
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from None
            raise
        finally:
            # Also when cancelled (a crash, in tests): peers must see the connections close.
            for c in [*self._peers.values(), self._coord, self._watch_client, self._attach_client]:
                if c is not None:
                    await c.aclose()
        return result

    async def _loop(self, main) -> Any:
        while True:
            if self._failed:
                raise GroupFailed(f"group {self.group}: more ranks failed than the parity survives")
            if self._need_rollback:
                with trio.CancelScope() as scope:
                    self._app_scope = scope  # a newer failure interrupts the rollback too
                    try:
                        await self._rollback()
                    finally:
                        self._app_scope = None
                continue
            with trio.CancelScope() as scope:
                self._app_scope = scope
                try:
                    if self.number < 0:
                        await self._checkpoint_zero()
                    await self._wait(lambda: self.view.get("phase") in ("running", "finished"))
                    self._due = trio.current_time() + self.interval
                    result = await main(self)
                    await self._finish()
                    return result
                except _Rollback:
                    pass
                finally:
                    self._app_scope = None

    async def _finish(self) -> None:
        """Wait for every rank to finish, still taking part in checkpoints: a
        rank that finished early must not hold the others' rounds or grants,
        and must still be able to roll back if a peer fails now."""
        await self._shipped.wait()  # our last checkpoint commits before we finish
        while True:
            try:
                await self._call("finish", {})
                break
            except RpcConnectionError:
                await trio.sleep(0.05)  # retry back-off: the coordinator restarts
        while self.view.get("phase") != "finished":
            if self._need_rollback or self._failed:
                raise _Rollback
            if self._coord_ok.is_set() and self.view.get("phase") == "running":
                if self.mode == "enhanced":
                    await self._enhanced()
                else:
                    await self._blocking(final=True)
            with trio.move_on_after(self.interval):
                await self._view_changed.wait()

    async def _wait(self, cond: Callable[[], bool]) -> None:
        while not cond():
            if self._need_rollback or self._failed:
                raise _Rollback
            await self._view_changed.wait()

    def _interrupt(self) -> None:
        if self._app_scope is not None:
            self._app_scope.cancel()

    # -- the coordinator connection ------------------------------------------------
    async def _join(self) -> None:
        while True:
            try:
                for c in (self._coord, self._watch_client, self._attach_client):
                    if c is not None:
                        await c.aclose()
                self._coord = await self._connect_coordinator()
                self._watch_client = await self._connect_coordinator()
                self._attach_client = await self._connect_coordinator()
                reply = await self._coordinator.call("join", {
                    "group": self.group, "rank": self.rank, "n": self.n, "mode": self.mode,
                    "block_size": self.block_size, "m": self.m, "have": self.number, "epoch": self.epoch,
                    "addr": list(_open(self.addr)), "key": self.key,
                })
                break
            except (OSError, RpcError) as exc:
                if isinstance(exc, RpcError) and exc.code not in ("rank_taken",) and not isinstance(
                        exc, RpcConnectionError):
                    raise
                await trio.sleep(0.1)  # retry back-off: the coordinator is restarting, or has not seen us go
        self.key, self.chunk = reply["key"], reply["chunk"]
        self._version = -1
        self._joined.set()
        # The group as it is now: a replacement (or a rank the coordinator gave
        # up on) sees a newer epoch here and rolls back before anything else.
        session = {"group": self.group, "rank": self.rank, "key": self.key}
        self._on_view(await _open(self._watch_client).call("watch", {**session, "version": -1}))
        if reply["number"] >= 0 and reply["number"] != self.number:
            await self._fetch_image(reply["number"], reply["size"])
        self._coord_ok.set()

    async def _connect_coordinator(self) -> RpcClient:
        return await connect_tcp(self.coordinator, token=self.token, max_frame=self.max_frame, timeout=5.0)

    async def _fetch_image(self, number: int, size: int) -> None:
        """A replacement: read the lost rank's checkpoint, decoded by the coordinator."""
        t0 = trio.current_time()
        self._ensure(size)
        ranges = list(range(0, size, self.chunk))

        epoch = self.view["epoch"]

        async def fetch(queue: list[int]) -> None:
            while queue:
                off = queue.pop(0)
                for attempt in range(50):
                    try:
                        data = await self._coordinator.call("recover_read", {
                            "group": self.group, "rank": self.rank, "key": self.key, "epoch": epoch,
                            "offset": off, "length": min(self.chunk, size - off)}, timeout=120.0)
                        break
                    except RpcError as exc:
                        if exc.code != "survivor_unreachable" or attempt == 49:
                            raise
                        await trio.sleep(0.1)  # retry back-off: a survivor is still rolling back
                self._ckpt[off : off + len(data)] = np.frombuffer(data, dtype=np.uint8)

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # a few ranges in flight hide the round trips
                nursery.start_soon(fetch, ranges)
        self._ckpt_size, self.number = size, number
        self.stats["recovered_bytes"] = size
        self.stats["recovery_seconds"] = trio.current_time() - t0

    async def _call(self, method: str, params: dict[str, Any], timeout: float = 60.0) -> Any:
        await self._coord_ok.wait()
        params = {"group": self.group, "rank": self.rank, "key": self.key, "epoch": self.epoch, **params}
        try:
            return await self._coordinator.call(method, params, timeout=timeout)
        except RpcError as exc:
            if exc.code == "stale_epoch" or self._need_rollback:
                if exc.code != "stale_epoch":
                    log.info("rank %d: %s refused during a rollback: %s", self.rank, method, exc)
                raise _Rollback from None
            raise

    async def _watcher(self) -> None:
        while True:
            try:
                await self._coord_ok.wait()
                session = {"group": self.group, "rank": self.rank, "key": self.key}
                view = await _open(self._watch_client).call("watch", {**session, "version": self._version},
                                                            timeout=60.0)
            except (RpcError, OSError) as exc:
                if isinstance(exc, RpcError) and not isinstance(exc, RpcConnectionError) and exc.code not in (
                        "unknown_group", "bad_identity", "timeout"):
                    raise
                log.info("rank %d: lost the coordinator (%s); joining again", self.rank, exc)
                self._coord_ok = trio.Event()
                self._joined = trio.Event()
                await self._join()
                continue
            self._on_view(view)

    async def _heartbeat(self) -> None:
        while True:
            await self._joined.wait()
            try:
                session = {"group": self.group, "rank": self.rank, "key": self.key}
                await _open(self._attach_client).call("attach", session, timeout=60.0)
            except (RpcError, OSError):
                await trio.sleep(0.05)  # the watcher reconnects; back off until it has

    def _on_view(self, view: dict[str, Any]) -> None:
        self.view = view
        self._version = view["version"]
        if "addrs" in view:
            for i, a in enumerate(view["addrs"]):
                if a is not None and self._addrs[i] != a:
                    self._addrs[i] = a
                    old = self._peers.pop(i, None)
                    if old is not None:
                        self._tasks.start_soon(old.aclose)
        if view["phase"] == "failed":
            self._failed = True
            self._interrupt()
        elif view["epoch"] > self.epoch and not self._recovering:
            self._need_rollback = True
            self._recovering = True
            self._interrupt()
        ev, self._view_changed = self._view_changed, trio.Event()
        ev.set()

    # -- rollback --------------------------------------------------------------------
    async def _rollback(self) -> None:
        t0 = trio.current_time()
        log.debug("rank %d: rollback: waiting for a checkpoint in flight", self.rank)
        await self._shipped.wait()  # a commit in flight decides which image is ours
        epoch = self.view["epoch"]
        log.debug("rank %d: rollback to epoch %d", self.rank, epoch)
        self.epoch = epoch  # from now on, messages of older epochs are dropped
        self.stats["rollbacks"] += 1
        for q in self._inbox:
            q.clear()
        for c in self._peers.values():
            self._tasks.start_soon(c.aclose)
        self._peers.clear()
        self._tx = self._rx = 0
        self._held = False
        if self.number >= 0:
            self._restore()
        else:
            self.msglog = MessageLog(self.rank)
            self.consumed = [-1] * self.n
            self.step = 0
        self._arrived = list(self.consumed)
        try:
            await self._call("ready", {"number": self.number, "consumed": self.consumed})
            await self._wait_resume(epoch)
        except _Rollback:
            # A newer epoch, or ready refused: start over at the next change of the group.
            log.debug("rank %d: rollback interrupted", self.rank)
            with trio.move_on_after(1.0):
                await self._view_changed.wait()
            return
        finally:
            self._recovering = False
        if self.view["epoch"] != epoch:
            self._need_rollback = True
            return
        # Resend what the peers had not consumed (the lost messages), in order.
        consumed = self.view["consumed"]
        for e in sorted(self.msglog.sent, key=lambda e: e.seq):
            if e.seq > consumed[e.dest][self.rank]:
                await self._transmit(e.dest, e.seq, e.payload)
                self.stats["replayed"] += 1
        self._need_rollback = False
        log.info("rank %d: rolled back to checkpoint %d in %.3fs", self.rank, self.number, trio.current_time() - t0)

    async def _wait_resume(self, epoch: int) -> None:
        while not (self.view["epoch"] == epoch and self.view["phase"] in ("running", "starting", "finished")
                   and "consumed" in self.view and self.view.get("consumed")):
            if self._failed:
                raise GroupFailed(f"group {self.group} failed")
            if self.view["epoch"] > epoch:
                return
            await self._view_changed.wait()

    def _restore(self) -> None:
        ck = self._ckpt
        for _name, view, off in self._layout:
            view[:] = ck[off : off + view.size]
        version, step, logsnap, consumed = msgpack.unpackb(bytes(ck[self._arrays_end : self._ckpt_size]))
        if version != META_VERSION:
            raise ValueError(f"checkpoint meta version {version}")
        self.step = step
        self.msglog = MessageLog.from_snapshot(logsnap)
        self.consumed = list(consumed)

    # -- checkpoints ---------------------------------------------------------------
    def _ensure(self, size: int) -> None:
        if size > self._ckpt.size:
            new = np.zeros(max(size, self._arrays_end + (1 << 20)), dtype=np.uint8)
            new[: self._ckpt.size] = self._ckpt
            self._ckpt = new

    def _capture(self) -> tuple[list[tuple[int, bytes]], int, list[int]]:
        """Deltas from the last image to the current state; the log moves to its next interval."""
        bs = self.block_size
        self.msglog.on_checkpoint()
        meta = msgpack.packb([META_VERSION, self.step, self.msglog.snapshot(), self.consumed])
        size = self._arrays_end + len(meta)
        self._ensure(max(size, self._ckpt_size))
        deltas: list[tuple[int, bytes]] = []
        for _name, view, off in self._layout:
            for k, d in changed_blocks(self._ckpt[off : off + view.size], view, bs):
                deltas.append((off // bs + k, d))
        base = self._arrays_end // bs
        old_meta = self._ckpt[self._arrays_end : max(self._ckpt_size, self._arrays_end)]
        for k, d in changed_blocks(old_meta, meta, bs):
            deltas.append((base + k, d))
        return deltas, size, list(self.consumed)

    async def _ship(self, number: int, deltas: list[tuple[int, bytes]], size: int, consumed: list[int],
                    overhead: float | None = None) -> bool:
        """Stream the deltas and commit; on success fold them into the local image."""
        batch: list[list[Any]] = []
        nbytes = 0
        try:
            for k, d in deltas:
                if nbytes + len(d) > self.chunk and batch:
                    await self._call("delta", {"number": number, "blocks": batch})
                    batch, nbytes = [], 0
                batch.append([k, d])
                nbytes += len(d)
            if batch:
                await self._call("delta", {"number": number, "blocks": batch})
            extra = {} if overhead is None else {"O": overhead}
            await self._call("commit", {"number": number, "size": size, "log_bytes": self.msglog.payload_bytes,
                                        "log_entries": len(self.msglog.sent) + len(self.msglog.receipts), **extra})
        except (_Rollback, RpcError, OSError) as exc:
            log.info("rank %d: checkpoint %d not committed (%s)", self.rank, number, type(exc).__name__)
            return False
        bs = self.block_size
        for k, d in deltas:
            xor_into(self._ckpt[k * bs : k * bs + len(d)], d)
        self._ckpt_size, self.number = size, number
        self.stats["checkpoints"] += 1
        self._tasks.start_soon(self._send_acks, consumed)
        return True

    async def _send_acks(self, consumed: list[int]) -> None:
        """Tell each source how far our committed image has consumed its messages."""
        epoch = self.epoch
        for src, seq in enumerate(consumed):
            if src == self.rank or seq < 0:
                continue
            try:
                client = await self._peer(src)
                await client.call("ack", {"src": self.rank, "upto": seq, "epoch": epoch}, timeout=10.0)
            except (RpcError, OSError):
                pass  # the peer is gone; its replacement learns it at resume

    async def _checkpoint_zero(self) -> None:
        while True:
            deltas, size, consumed = self._capture()
            if await self._ship_shielded(0, deltas, size, consumed):
                return
            if self._need_rollback or self._failed:
                raise _Rollback
            await self._coord_ok.wait()
            await trio.sleep(0.05)  # retry back-off: the coordinator was away

    async def _ship_shielded(self, number, deltas, size, consumed) -> bool:
        # A commit must not be cut off between the coordinator applying it and
        # us folding it into our image; calls are bounded by their timeouts.
        self._shipped = trio.Event()
        try:
            with trio.CancelScope(shield=True):
                return await self._ship(number, deltas, size, consumed)
            return False  # not reached: a shielded scope nobody cancels catches nothing
        finally:
            self._shipped.set()

    async def _enhanced(self) -> None:
        if self._shipping:
            return
        now = trio.current_time()
        if self._held:
            if self.rank not in self.view.get("taking", ()):
                return
            self._held = False
        elif now >= self._due:
            reply = await self._try("request", {"number": self.number + 1})
            if reply is None:
                self._due = now + self.interval
                return
            if not reply["granted"]:
                self._held = True
                return
        else:
            return
        t0 = trio.current_time()
        number = self.number + 1
        deltas, size, consumed = self._capture()
        overhead = trio.current_time() - t0
        self._shipping = True
        self._shipped = trio.Event()
        self._tasks.start_soon(self._ship_background, number, deltas, size, consumed, overhead)

    async def _ship_background(self, number, deltas, size, consumed, overhead) -> None:
        try:
            if await self._ship(number, deltas, size, consumed, overhead):
                self.stats["overhead"].append(overhead)
        finally:
            self._shipping = False
            self._due = trio.current_time() + self.interval
            self._shipped.set()

    async def _try(self, method: str, params: dict[str, Any]) -> Any:
        try:
            return await self._call(method, params)
        except RpcError as exc:
            log.debug("rank %d: %s refused (%s)", self.rank, method, exc)
            return None

    async def _blocking(self, final: bool = False) -> None:
        now = trio.current_time()
        pending, target = self.view.get("round", (False, None))
        if not pending and now >= self._due and not final:
            if await self._try("propose", {}) is None:
                self._due = now + self.interval
                return
            pending = True
        if not pending:
            return
        reply = await self._try("at_step", {"step": self.step})
        if reply is None:
            return
        target, number = reply
        if self.step < target and not final:
            return  # (a finished rank's state no longer changes: any target is reached)
        t0 = trio.current_time()
        try:
            while not await self._call("freeze", {"number": number, "sent": self._tx, "received": self._rx}):
                pass  # woken by a change at the coordinator: report the totals again
            deltas, size, consumed = self._capture()
            if await self._ship_shielded(number, deltas, size, consumed):
                await self._call("barrier", {"number": number}, timeout=3600.0)
                overhead = trio.current_time() - t0
                self.stats["overhead"].append(overhead)
                await self._try("stats", {"O": overhead})
        except RpcError as exc:
            log.info("rank %d: blocking round %d abandoned (%s)", self.rank, number, exc)
        self._due = trio.current_time() + self.interval

    # -- messages between ranks ------------------------------------------------------
    async def _peer(self, dest: int) -> RpcClient:
        c = self._peers.get(dest)
        if c is None or c._broken is not None:  # noqa: SLF001 - reconnect a broken client
            addr = self._addrs[dest]
            if addr is None:
                raise RpcConnectionError("connection_lost", f"no address for rank {dest} yet")
            c = await connect_tcp(ListenAddr(*addr), token=self.token, max_frame=self.max_frame, timeout=5.0)
            self._peers[dest] = c
        return c

    async def _transmit(self, dest: int, seq: int, payload: bytes) -> None:
        while True:
            try:
                client = await self._peer(dest)
                await client.call("msg", {"src": self.rank, "seq": seq, "epoch": self.epoch, "data": payload})
                self._tx += 1
                return
            except (RpcError, OSError) as exc:
                if isinstance(exc, RpcError) and exc.code == "busy":
                    pass
                # The peer is gone or not there yet: a rollback will cancel us, or it comes back.
                await trio.sleep(0.02)

    @rpc_method("msg", Msg)
    async def _on_msg(self, p: Msg) -> bool:
        if p.src >= self.n or p.src == self.rank:
            raise BadParams(f"src: no rank {p.src} sends to rank {self.rank} of {self.n}")
        if p.epoch < self.epoch:
            return False  # from before a rollback: the sender will resend what is needed
        self._rx += 1
        if p.seq <= self._arrived[p.src]:
            self.stats["dropped"] += 1  # an orphan (or duplicate): consumed before our checkpoint
            return False
        if len(self._inbox[p.src]) >= MAX_INBOX:
            raise RpcError("busy", "inbox full")
        self._arrived[p.src] = p.seq
        self._inbox[p.src].append((p.seq, p.data))
        ev, self._arrival = self._arrival, trio.Event()
        ev.set()
        return True

    @rpc_method("ack", Ack)
    async def _on_ack(self, p: Ack) -> bool:
        for e in self.msglog.sent:
            if e.dest == p.src and e.seq <= p.upto and e.status == SENT:
                self.msglog.on_ack(p.src, e.seq)
        return True

    @rpc_method("ckpt_read", CkptRead)
    async def _on_read(self, p: CkptRead) -> bytes:
        if p.length > self.max_frame // 2:
            raise BadParams(f"length: must be <= {self.max_frame // 2}")
        return self._ckpt[p.offset : min(p.offset + p.length, self._ckpt_size)].tobytes()

    @rpc_method("ckpt_size")
    async def _on_size(self) -> int:
        return self._ckpt_size
