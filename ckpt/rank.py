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
last committed image in its own memory (``image``); a checkpoint sends the
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
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import msgpack
import numpy as np
import trio

from shoal.ckpt.image import Image
from shoal.ckpt.link import CoordinatorLink, GroupFailed, RollingBack, unwrap
from shoal.ckpt.mailbox import Mailbox
from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.rpc import RpcConnectionError, RpcError, RpcServer, handlers_of
from shoal.protocol.checkpoint import AtStep, Barrier, Commit, Delta, Freeze, Member, Ready, Request, Stats

__all__ = ["ANY_LOOPBACK_PORT", "GroupFailed", "Rank"]

log = logging.getLogger("shoal.checkpoint.rank")

META_VERSION = 1
DEFAULT_MAX_FRAME = 8 << 20
#: A rank's own RPC server listens on loopback, on a port of the kernel's choosing, by default.
ANY_LOOPBACK_PORT = ListenAddr("127.0.0.1", 0)


class Rank:
    """One rank of a checkpoint group; see the module docstring.

    It wires three helpers together: :attr:`link` (the coordinator connection,
    the group's view, the epoch and checkpoint numbers), :attr:`mail` (the
    inbox and the message log) and :attr:`image` (the registered buffers and
    the committed checkpoint image), and decides when to checkpoint and how to
    roll back.
    """

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
        coordinator_timeout: float = 60.0,
        recovery_timeout: float = 120.0,
    ) -> None:
        if not 0 <= rank < n:
            raise ValueError(f"rank {rank} is outside 0..{n - 1}")
        if mode not in ("enhanced", "blocking"):
            raise ValueError("mode is 'enhanced' or 'blocking'")
        self.group, self.rank, self.n, self.mode, self.interval = group, rank, n, mode, interval
        self.token, self.listen, self.max_frame = token, listen, max_frame
        self.params: dict[str, Any] = {}  # the app's own settings (not checkpointed)
        # what happened, for tests, the demo and the benchmarks
        self.stats: dict[str, Any] = {"checkpoints": 0, "overhead": [], "rollbacks": 0, "replayed": 0,
                                      "dropped": 0, "recovered_bytes": 0, "recovery_seconds": None}
        self.step = 0  # safe points passed (checkpointed)
        self.image = Image(block_size, max_frame)
        self.state = self.image.state  # the registered buffers, by name
        self.link = CoordinatorLink(coordinator, group, rank, n, mode=mode, block_size=block_size,
                                    parity_shards=parity_shards, token=token, max_frame=max_frame,
                                    interrupt=self._interrupt, on_addrs=self._peers_moved, fetch=self._fetch_image,
                                    coordinator_timeout=coordinator_timeout, recovery_timeout=recovery_timeout)
        self.mail = Mailbox(rank, n, epoch=lambda: self.link.epoch, token=token, max_frame=max_frame,
                            stats=self.stats)
        self._nursery: trio.Nursery | None = None
        self._app_scope: trio.CancelScope | None = None
        # when to checkpoint
        self._shipping = False  # enhanced mode: a checkpoint is being shipped in the background
        self._shipped = trio.Event()  # no commit in flight
        self._shipped.set()
        self._held = False  # enhanced mode: our request is held until the coordinator releases it
        self._due = math.inf  # when the timer fires

    @property
    def addr(self) -> ListenAddr | None:
        """Our own server's address (once ``run`` listens)."""
        return self.link.addr

    @property
    def _tasks(self) -> trio.Nursery:
        """The nursery of ``run`` (its background tasks)."""
        assert self._nursery is not None, "used before run() set it up"
        return self._nursery

    # -- registration -----------------------------------------------------------
    def register(self, name: str, buf: Any) -> Any:
        """Register a buffer (updated in place by the app); returns it."""
        if self._nursery is not None:
            raise RuntimeError("register every buffer before run()")
        return self.image.register(name, buf)

    # -- the app's calls -----------------------------------------------------------
    async def send(self, dest: int, data: bytes | np.ndarray) -> None:
        """Send ``data`` to rank ``dest`` (logged in the sent table)."""
        await self.mail.send(dest, data)

    async def recv(self, src: int) -> bytes:
        """The next message from rank ``src``."""
        return await self.mail.recv(src)

    async def safe_point(self) -> None:
        """End of a step: the registered state is consistent; a checkpoint may be taken."""
        self.step += 1
        await trio.lowlevel.checkpoint()
        if not self.link.ok.is_set() or self.link.view.get("phase") != "running":
            return
        if self.mode == "enhanced":
            await self._enhanced()
        else:
            await self._blocking()

    # -- running ---------------------------------------------------------------
    async def run(self, main: Callable[[Rank], Awaitable[Any]]) -> Any:
        """Join, checkpoint, run ``main`` (again after every rollback); return its result."""
        server = RpcServer(handlers_of(self.mail, self.image), token=self.token, max_frame=self.max_frame,
                           name=f"shoal-rank-{self.group}")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.link.addr = await nursery.start(partial(server.serve_tcp, self.listen))
                nursery.start_soon(self.link.heartbeat)
                await self.link.join()
                nursery.start_soon(self.link.watch)
                result = await self._loop(main)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps what _loop raises; GroupFailed is the app's to catch.
            first = unwrap(group, GroupFailed)
            if first is not None:
                raise first from None
            raise
        finally:
            # Also when cancelled (a crash, in tests): peers must see the connections close.
            await self.mail.aclose()
            await self.link.aclose()
        return result

    async def _loop(self, main: Callable[[Rank], Awaitable[Any]]) -> Any:
        link = self.link
        while True:
            if link.failed:
                reason = link.reason or "more ranks failed than the parity survives"
                log.error("rank %d: group %s failed: %s", self.rank, self.group, reason)
                raise GroupFailed(f"group {self.group}: {reason}")
            if link.need_rollback:
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
                    if link.number < 0:
                        await self._checkpoint_zero()
                    await link.wait(lambda: link.view.get("phase") in ("running", "finished"))
                    self._due = trio.current_time() + self.interval
                    link.running = True
                    result = await main(self)
                    await self._finish()
                    return result
                except RollingBack:
                    link.finished = False  # main runs again after the rollback
                finally:
                    self._app_scope = None

    async def _finish(self) -> None:
        """Wait for every rank to finish, still taking part in checkpoints: a
        rank that finished early must not hold the others' rounds or grants,
        and must still be able to roll back if a peer fails now."""
        link = self.link
        await self._shipped.wait()  # our last checkpoint commits before we finish
        link.finished = True  # a rejoin tells a restarted coordinator
        while link.view.get("phase") != "finished":
            try:
                await link.call("finish", Member)
                break
            except RpcError as exc:
                # The coordinator restarting (the watcher joins again, within
                # coordinator_timeout) or our session replaced by that rejoin.
                if not isinstance(exc, RpcConnectionError) and exc.code not in ("bad_identity", "unknown_group"):
                    raise
                await trio.sleep(0.05)  # retry back-off: the coordinator restarts
        while link.view.get("phase") != "finished":
            if link.need_rollback or link.failed:
                raise RollingBack
            if link.ok.is_set() and link.view.get("phase") == "running":
                if self.mode == "enhanced":
                    await self._enhanced()
                else:
                    await self._blocking(final=True)
            with trio.move_on_after(self.interval):
                await link.changed.wait()

    def _interrupt(self) -> None:
        if self._app_scope is not None:
            self._app_scope.cancel()

    def _peers_moved(self, addrs: list[Any]) -> None:
        self.mail.set_addrs(addrs, self._tasks)

    async def _fetch_image(self, number: int, size: int) -> None:
        """A replacement: read the lost rank's checkpoint, decoded by the coordinator."""
        t0 = trio.current_time()
        link, chunk = self.link, self.link.chunk
        self.image.ensure(size)
        ranges = list(range(0, size, chunk))

        epoch = link.view["epoch"]

        async def fetch(queue: list[int]) -> None:
            while queue:
                off = queue.pop(0)
                self.image.write(off, await link.recover_read(epoch, off, min(chunk, size - off)))

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # a few ranges in flight hide the round trips
                nursery.start_soon(fetch, ranges)
        self.image.size, link.number = size, number
        self.stats["recovered_bytes"] = size
        self.stats["recovery_seconds"] = trio.current_time() - t0

    # -- rollback --------------------------------------------------------------------
    async def _rollback(self) -> None:
        link = self.link
        t0 = trio.current_time()
        log.debug("rank %d: rollback: waiting for a checkpoint in flight", self.rank)
        await self._shipped.wait()  # a commit in flight decides which image is ours
        epoch = link.view["epoch"]
        log.debug("rank %d: rollback to epoch %d", self.rank, epoch)
        link.epoch = epoch  # from now on, messages of older epochs are dropped
        self.stats["rollbacks"] += 1
        self.mail.reset(self._tasks)
        self._held = False
        if link.number >= 0:
            self._restore()
        else:
            self.mail.restore(None, None)
            self.step = 0
        try:
            await link.call("ready", Ready, number=link.number, consumed=self.mail.consumed)
            await link.wait_resume(epoch)
        except RollingBack:
            # A newer epoch, or ready refused: start over at the next change of the group.
            log.debug("rank %d: rollback interrupted", self.rank)
            with trio.move_on_after(1.0):
                await link.changed.wait()
            return
        finally:
            link.recovering = False
        if link.view["epoch"] != epoch:
            link.need_rollback = True
            return
        # Resend what the peers had not consumed (the lost messages), in order.
        await self.mail.replay(link.view["consumed"])
        link.need_rollback = False
        log.info("rank %d: rolled back to checkpoint %d in %.3fs", self.rank, link.number,
                 trio.current_time() - t0)

    def _restore(self) -> None:
        version, step, logsnap, consumed = msgpack.unpackb(self.image.restore())
        if version != META_VERSION:
            raise ValueError(f"checkpoint meta version {version}")
        self.step = step
        self.mail.restore(logsnap, consumed)

    # -- checkpoints ---------------------------------------------------------------
    def _capture(self) -> tuple[list[tuple[int, bytes]], int, list[int]]:
        """Deltas from the last image to the current state; the log moves to its next interval."""
        logsnap, consumed = self.mail.checkpoint()
        meta = msgpack.packb([META_VERSION, self.step, logsnap, consumed])
        deltas, size = self.image.capture(meta)
        return deltas, size, consumed

    async def _ship(self, number: int, deltas: list[tuple[int, bytes]], size: int, consumed: list[int],
                    overhead: float | None = None) -> bool:
        """Stream the deltas and commit; on success fold them into the local image."""
        link = self.link
        batch: list[Any] = []
        nbytes = 0
        try:
            # wait=False: with the coordinator away the checkpoint is abandoned at
            # once (this may run shielded from cancellation: it must never wait long).
            for k, d in deltas:
                if nbytes + len(d) > link.chunk and batch:
                    await link.call("delta", Delta, number=number, blocks=batch, wait=False)
                    batch, nbytes = [], 0
                batch.append([k, d])
                nbytes += len(d)
            if batch:
                await link.call("delta", Delta, number=number, blocks=batch, wait=False)
            log_bytes, log_entries = self.mail.log_figures()
            await link.call("commit", Commit, number=number, size=size, log_bytes=log_bytes,
                            log_entries=log_entries, O=overhead, wait=False)
        except (RollingBack, RpcError, OSError) as exc:
            log.info("rank %d: checkpoint %d not committed (%s)", self.rank, number, type(exc).__name__)
            return False
        self.image.fold(deltas, size)
        link.number = number
        self.stats["checkpoints"] += 1
        self._tasks.start_soon(self.mail.send_acks, consumed)
        return True

    async def _checkpoint_zero(self) -> None:
        while True:
            deltas, size, consumed = self._capture()
            if await self._ship_shielded(0, deltas, size, consumed):
                return
            if self.link.need_rollback or self.link.failed:
                raise RollingBack
            await self.link.wait_ok()
            await trio.sleep(0.05)  # retry back-off: the coordinator was away

    async def _ship_shielded(self, number: int, deltas: list[tuple[int, bytes]], size: int,
                             consumed: list[int]) -> bool:
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
            if self.rank not in self.link.view.get("taking", ()):
                return
            self._held = False
        elif now >= self._due:
            reply = await self.link.try_call("request", Request, number=self.link.number + 1)
            if reply is None:
                self._due = now + self.interval
                return
            if not reply["granted"]:
                self._held = True
                return
        else:
            return
        t0 = trio.current_time()
        number = self.link.number + 1
        deltas, size, consumed = self._capture()
        overhead = trio.current_time() - t0
        self._shipping = True
        self._shipped = trio.Event()
        self._tasks.start_soon(self._ship_background, number, deltas, size, consumed, overhead)

    async def _ship_background(self, number: int, deltas: list[tuple[int, bytes]], size: int,
                               consumed: list[int], overhead: float) -> None:
        try:
            if await self._ship(number, deltas, size, consumed, overhead):
                self.stats["overhead"].append(overhead)
        finally:
            self._shipping = False
            self._due = trio.current_time() + self.interval
            self._shipped.set()

    async def _blocking(self, final: bool = False) -> None:
        link = self.link
        now = trio.current_time()
        pending, target = link.view.get("round", (False, None))
        if not pending and now >= self._due and not final:
            if await link.try_call("propose", Member) is None:
                self._due = now + self.interval
                return
            pending = True
        if not pending:
            return
        reply = await link.try_call("at_step", AtStep, step=self.step)
        if reply is None:
            return
        target, number = reply
        if self.step < target and not final:
            return  # (a finished rank's state no longer changes: any target is reached)
        t0 = trio.current_time()
        try:
            with trio.move_on_after(link.recovery_timeout) as frozen:
                while not await link.call("freeze", Freeze, number=number, sent=self.mail.tx,
                                          received=self.mail.rx):
                    pass  # woken by a change at the coordinator: report the totals again
            if frozen.cancelled_caught:
                raise link.timed_out(f"blocking round {number} to be granted")
            deltas, size, consumed = self._capture()
            if await self._ship_shielded(number, deltas, size, consumed):
                await link.call("barrier", Barrier, timeout=link.recovery_timeout, number=number)
                overhead = trio.current_time() - t0
                self.stats["overhead"].append(overhead)
                await link.try_call("stats", Stats, O=overhead)
        except RpcError as exc:
            log.info("rank %d: blocking round %d abandoned (%s)", self.rank, number, exc)
        self._due = trio.current_time() + self.interval
