"""A rank's connection to the coordinator and its view of the group.

The link joins the group (``join``: a session key, the chunk size, the
checkpoint the coordinator holds for this rank), keeps the rank's session
alive (``attach``, a long poll that is the heartbeat) and follows the group
(``watch``, a long poll answered with each new view). It holds the numbers the
coordinator and the rank agree on: the epoch (bumped by every rollback) and
the last committed checkpoint. When the coordinator is lost (or restarted) the
link joins again, naming the epoch and the checkpoint it holds.

Every short call (:meth:`CoordinatorLink.call`) names the session and the
epoch, with its parameters built from the contracts of
:mod:`shoal.protocol.checkpoint`; a call refused ``stale_epoch`` (or any call
refused during a rollback) raises :class:`RollingBack`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.rpc import RpcClient, RpcConnectionError, RpcError, connect_tcp
from shoal.protocol.checkpoint import Join, RecoverRead, Session, Watch
from shoal.protocol.contract import Contract

log = logging.getLogger("shoal.checkpoint.rank")


def unwrap(group: BaseExceptionGroup, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` in a nursery's exception group if that is all it holds (else None),
    so a caller raises the error itself rather than the group trio wrapped it in."""
    match, rest = group.split(kind)
    if match is None or rest is not None:
        return None
    first: BaseException = match
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


class GroupFailed(Exception):
    """The group cannot go on; ``reason`` says why (the same words as the coordinator's log line).

    Raised by ``Rank.run`` when more ranks failed at once than the parity survives,
    when the coordinator failed the group (a rank lost its state while the
    coordinator was away, ranks missing after a coordinator restart), when the
    coordinator stayed unreachable for ``coordinator_timeout`` seconds, or when a
    start, a recovery or a blocking round did not complete within
    ``recovery_timeout`` seconds. It never hides a wrong result: the rank's
    state is not returned."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RollingBack(Exception):
    """The group rolled back (or a call was refused during a rollback): the app's run is interrupted."""


def _open(value: RpcClient | None) -> RpcClient:
    """A connection ``join`` has opened by now."""
    assert value is not None, "used before join() opened it"
    return value


class CoordinatorLink:
    """The coordinator connection of one rank, its session and the group's view."""

    def __init__(
        self,
        coordinator: ListenAddr,
        group: str,
        rank: int,
        n: int,
        *,
        mode: str,
        block_size: int,
        parity_shards: int,
        token: bytes | None,
        max_frame: int,
        interrupt: Callable[[], None],
        on_addrs: Callable[[list[Any]], None],
        fetch: Callable[[int, int], Awaitable[None]],
        coordinator_timeout: float = 60.0,
        recovery_timeout: float = 120.0,
    ) -> None:
        self.coordinator, self.group, self.rank, self.n = coordinator, group, rank, n
        self.mode, self.block_size, self.m = mode, block_size, parity_shards
        self.token, self.max_frame = token, max_frame
        self.coordinator_timeout, self.recovery_timeout = coordinator_timeout, recovery_timeout
        self._interrupt = interrupt  # the app must stop: a rollback, or the group failed
        self._on_addrs = on_addrs  # the peers' addresses, from each view that names them
        self._fetch = fetch  # a replacement reads the image the coordinator holds for it
        self.addr: ListenAddr | None = None  # the rank's own server, named at join
        self.key = b""
        self.chunk = max_frame // 2
        self.epoch = 0
        self.number = -1  # last committed checkpoint
        self.view: dict[str, Any] = {"phase": "starting", "epoch": 0, "taking": [], "round": [False, None]}
        self.version = -1
        self.changed = trio.Event()  # set (and replaced) at each new view
        self.ok = trio.Event()  # joined and the image is ours: calls may flow
        self.joined = trio.Event()  # a session key is held (heartbeats may flow)
        self.need_rollback = False
        self.recovering = False
        self.failed = False
        self.reason = ""  # why the group failed, from the coordinator's view
        self.running = False  # main has run: our state has left checkpoint 0 (told at a rejoin)
        self.finished = False  # main returned (told at a rejoin, so a restarted coordinator can finish)
        # Long polls get connections of their own: RpcClient hands a response to
        # its caller through a shared read lock, so a short call answered while a
        # long poll holds that lock could wait for the poll's own answer.
        self._coord: RpcClient | None = None
        self._watch_client: RpcClient | None = None
        self._attach_client: RpcClient | None = None

    def _session(self) -> dict[str, Any]:
        return {"group": self.group, "rank": self.rank, "key": self.key}

    async def join(self) -> None:
        """Join (again), follow the group's view, and read our image if the coordinator holds a newer one.

        Retried while the coordinator is unreachable, for at most ``coordinator_timeout``
        seconds; then :class:`GroupFailed`."""
        assert self.addr is not None, "the rank's server is listening before it joins"
        deadline = trio.current_time() + self.coordinator_timeout
        while True:
            reply = await self._join_once(deadline)
            if reply.get("finished"):
                self.on_view({**self.view, "phase": "finished", "version": self.version})
                break
            self.key, self.chunk = reply["key"], reply["chunk"]
            self.version = -1
            self.joined.set()
            # The group as it is now: a replacement (or a rank the coordinator gave
            # up on) sees a newer epoch here and rolls back before anything else.
            try:
                self.on_view(await _open(self._watch_client).call(
                    "watch", Watch(**self._session(), version=-1).encode()))
                if reply["number"] >= 0 and reply["number"] != self.number:
                    # A replacement: our state is checkpoint reply["number"], not our
                    # initial one (a restarted coordinator must not take us for a rank
                    # still at checkpoint 0).
                    self.running = True
                    await self._fetch(reply["number"], reply["size"])
            except (OSError, RpcError) as exc:
                # The coordinator restarted, or the group moved on (failed) while we
                # read our image: join again, and learn which.
                log.info("rank %d: reading our image was cut off (%s); joining again", self.rank, exc)
                self.joined = trio.Event()
                if trio.current_time() >= deadline:
                    raise GroupFailed(f"group {self.group}: could not join and read our checkpoint within "
                                      f"{self.coordinator_timeout:g}s (coordinator_timeout): {exc}") from None
                await trio.sleep(0.1)  # retry back-off
                continue
            break
        self.ok.set()

    async def _join_once(self, deadline: float) -> dict[str, Any]:
        assert self.addr is not None, "the rank's server is listening before it joins"
        while True:
            try:
                for c in (self._coord, self._watch_client, self._attach_client):
                    if c is not None:
                        await c.aclose()
                self._coord = await self._connect()
                self._watch_client = await self._connect()
                self._attach_client = await self._connect()
                reply: dict[str, Any] = await self._coord.call("join", Join(
                    group=self.group, rank=self.rank, n=self.n, mode=self.mode, block_size=self.block_size,
                    m=self.m, have=self.number, epoch=self.epoch, addr=list(self.addr), key=self.key,
                    running=self.running, finished=self.finished,
                ).encode())
                break
            except (OSError, RpcError) as exc:
                if isinstance(exc, RpcError) and exc.code == "group_over":
                    if self.finished and f"{self.group!r} has finished" in exc.message:
                        # We had returned from main and the group finished meanwhile.
                        return {"finished": True}
                    raise GroupFailed(f"group {self.group}: {self.reason or exc.message}") from None
                if isinstance(exc, RpcError) and exc.code not in ("rank_taken",) and not isinstance(
                        exc, RpcConnectionError):
                    raise
                if trio.current_time() >= deadline:
                    log.error("rank %d: the coordinator %s unreachable for %gs (%s)", self.rank,
                              self.coordinator, self.coordinator_timeout, exc)
                    raise GroupFailed(f"group {self.group}: the coordinator {self.coordinator} was unreachable "
                                      f"for {self.coordinator_timeout:g}s (coordinator_timeout)") from None
                await trio.sleep(0.1)  # retry back-off: the coordinator is restarting, or has not seen us go
        return reply

    async def wait_ok(self) -> None:
        """Until joined (calls may flow); :class:`GroupFailed` past ``coordinator_timeout``
        (the watcher rejoining raises it first, normally)."""
        if self.ok.is_set():
            return
        with trio.move_on_after(self.coordinator_timeout + 5.0):
            await self.ok.wait()
            return
        raise GroupFailed(f"group {self.group}: not joined to the coordinator within "
                          f"{self.coordinator_timeout:g}s (coordinator_timeout)")

    async def _connect(self) -> RpcClient:
        return await connect_tcp(self.coordinator, token=self.token, max_frame=self.max_frame, timeout=5.0)

    async def recover_read(self, epoch: int, offset: int, length: int) -> bytes:
        """A range of our lost image, decoded by the coordinator (retried while a survivor rolls back)."""
        for attempt in range(50):
            try:
                data: bytes = await _open(self._coord).call("recover_read", RecoverRead(
                    **self._session(), epoch=epoch, offset=offset, length=length).encode(), timeout=120.0)
                return data
            except RpcError as exc:
                if exc.code != "survivor_unreachable" or attempt == 49:
                    raise
                await trio.sleep(0.1)  # retry back-off: a survivor is still rolling back
        raise AssertionError("not reached: the last attempt raises")

    async def call(self, method: str, contract: type[Contract], timeout: float = 60.0, *, wait: bool = True,
                   **fields: Any) -> Any:
        """A call naming our session and epoch (built once joined, with the key and epoch of then).

        ``wait=False``: if not joined now (the coordinator is away), fail at once
        (:class:`RpcConnectionError`) instead of waiting for the rejoin."""
        if not wait and not self.ok.is_set():
            raise RpcConnectionError("not_connected", "the coordinator is away")
        await self.wait_ok()
        params = contract(**self._session(), epoch=self.epoch, **fields).encode()
        try:
            return await _open(self._coord).call(method, params, timeout=timeout)
        except RpcError as exc:
            if exc.code == "stale_epoch" or self.need_rollback:
                if exc.code != "stale_epoch":
                    log.info("rank %d: %s refused during a rollback: %s", self.rank, method, exc)
                raise RollingBack from None
            raise

    async def try_call(self, method: str, contract: type[Contract], **fields: Any) -> Any:
        """:meth:`call`, None if refused."""
        try:
            return await self.call(method, contract, **fields)
        except RpcError as exc:
            log.debug("rank %d: %s refused (%s)", self.rank, method, exc)
            return None

    async def watch(self) -> None:
        """Follow the group's view (a long poll); join again if the coordinator is lost."""
        while True:
            try:
                await self.ok.wait()
                view = await _open(self._watch_client).call(
                    "watch", Watch(**self._session(), version=self.version).encode(), timeout=60.0)
            except (RpcError, OSError) as exc:
                if isinstance(exc, RpcError) and not isinstance(exc, RpcConnectionError) and exc.code not in (
                        "unknown_group", "bad_identity", "timeout"):
                    raise
                log.info("rank %d: lost the coordinator (%s); joining again", self.rank, exc)
                self.ok = trio.Event()
                self.joined = trio.Event()
                await self.join()
                if self.view.get("phase") == "finished" and self.finished:
                    return  # the group finished while we were away: nothing left to follow
                continue
            self.on_view(view)

    async def heartbeat(self) -> None:
        """Keep the session alive (a long poll the coordinator holds while we live)."""
        while True:
            await self.joined.wait()
            try:
                await _open(self._attach_client).call("attach", Session(**self._session()).encode(), timeout=60.0)
            except (RpcError, OSError):
                await trio.sleep(0.05)  # the watcher reconnects; back off until it has

    def on_view(self, view: dict[str, Any]) -> None:
        self.view = view
        self.version = view["version"]
        if "addrs" in view:
            self._on_addrs(view["addrs"])
        if view["phase"] == "failed":
            self.failed = True
            self.reason = view.get("reason", "")
            self._interrupt()
        elif view["epoch"] > self.epoch and not self.recovering:
            self.need_rollback = True
            self.recovering = True
            self._interrupt()
        ev, self.changed = self.changed, trio.Event()
        ev.set()

    async def wait(self, cond: Callable[[], bool], what: str = "the group to start") -> None:
        """Until ``cond()`` holds of the view; :class:`RollingBack` if the group rolls back first,
        :class:`GroupFailed` past ``recovery_timeout``."""
        with trio.move_on_after(self.recovery_timeout):
            while not cond():
                if self.need_rollback or self.failed:
                    raise RollingBack
                await self.changed.wait()
            return
        raise self.timed_out(what)

    def timed_out(self, what: str) -> GroupFailed:
        log.error("rank %d: waited %gs for %s (recovery_timeout); giving up", self.rank, self.recovery_timeout, what)
        return GroupFailed(f"group {self.group}: waited {self.recovery_timeout:g}s for {what} (recovery_timeout)")

    async def wait_resume(self, epoch: int) -> None:
        """Until every rank is ready in ``epoch`` (the view then names what each consumed), or a newer epoch;
        :class:`GroupFailed` past ``recovery_timeout``."""
        with trio.move_on_after(self.recovery_timeout):
            while not (self.view["epoch"] == epoch and self.view["phase"] in ("running", "starting", "finished")
                       and "consumed" in self.view and self.view.get("consumed")):
                if self.failed:
                    raise GroupFailed(f"group {self.group} failed: {self.reason or 'the coordinator failed it'}")
                if self.view["epoch"] > epoch:
                    return
                await self.changed.wait()
            return
        raise self.timed_out("every rank to roll back")

    async def aclose(self) -> None:
        for c in (self._coord, self._watch_client, self._attach_client):
            if c is not None:
                await c.aclose()
