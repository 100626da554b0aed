"""The tracker daemon: HTTP (h11 via the runtime) and UDP listeners around TrackerService."""

from __future__ import annotations

import logging
import os
import socket
import time
from functools import partial
from pathlib import Path

import trio

from shoal.daemons.runtime.config import ConfigError, ListenAddr
from shoal.daemons.runtime.daemon import DaemonContext
from shoal.daemons.runtime.http import (
    HttpConnectionHandler,
    HttpRequest,
    HttpResponse,
    bound_address,
    open_listeners,
)
from shoal.daemons.runtime.state import StateSaver, atomic_write
from shoal.daemons.tracker.access import AddressSlots, ConnectionIds, load_policy
from shoal.daemons.tracker.config import TrackerConfig
from shoal.daemons.tracker.metrics import TrackerMetrics
from shoal.daemons.tracker.service import TrackerService, client_ip
from shoal.daemons.tracker.swarm import SwarmTable

log = logging.getLogger("shoal.tracker")

# The largest BEP 15 request is a scrape of 74 hashes (1496 bytes), or an
# announce with BEP 41 options; anything that does not fit is malformed.
MAX_DATAGRAM = 2048
# Datagrams handled per wake-up before yielding to other tasks: large enough
# to amortise the wait, small enough (~2 ms of work) to keep HTTP responsive.
UDP_BATCH = 64
STATE_FILE = "swarms.msgpack"
SECRET_FILE = "udp-secret"


class TrackerApp:
    def __init__(self, ctx: DaemonContext) -> None:
        cfg: TrackerConfig = ctx.config
        self.ctx = ctx
        self.config = cfg
        t = cfg.tracker
        self.table = SwarmTable(
            max_torrents=t.max_torrents, max_peers_per_torrent=t.max_peers_per_torrent, max_peers=t.max_peers
        )
        self.metrics = TrackerMetrics(ctx.registry, self.table.stats)
        # Connection ids count wall-clock minutes (see ConnectionIds), so an
        # id handed out before a restart is still accepted after it.
        ids = ConnectionIds(self._secret(ctx.state_dir / SECRET_FILE), time.time() - trio.current_time())
        self.service = TrackerService(t, load_policy(cfg.access), self.table, self.metrics, ids)
        self.http = HttpConnectionHandler(
            self._handle_http,
            max_request_bytes=t.max_request_bytes,
            idle_timeout=t.header_timeout,
            max_connections=t.max_http_connections,
            on_error=partial(self.metrics.reject, "http"),
        )
        self.http_slots = AddressSlots(t.max_http_connections_per_ip)
        self.state_file: Path = ctx.state_dir / STATE_FILE
        self._saver_scope = trio.CancelScope()
        self.saver = StateSaver("swarm", self.state_file, lambda: self.table.snapshot(trio.current_time()),
                                t.save_interval, metrics=ctx.metrics, log=log)

    @staticmethod
    def _secret(path: Path) -> bytes:
        """The key for BEP 15 connection ids, kept across restarts.

        Clients cache a connection id for a minute (libtorrent per tracker IP,
        process-wide); with a fresh key after every restart they would send
        rejected ids until their cache expired.
        """
        try:
            secret = path.read_bytes()
            if len(secret) == 32:
                return secret
            log.warning("%s is not 32 bytes; making a new one", path)
        except FileNotFoundError:
            pass
        secret = os.urandom(32)
        atomic_write(path, secret)
        return secret

    # -- lifecycle -----------------------------------------------------------

    async def run(self, ctx: DaemonContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._restore()
        t = self.config.tracker
        try:
            async with trio.open_nursery() as nursery:
                addresses: dict[str, ListenAddr] = {}
                if t.http_listen is not None:
                    addresses["http"] = await nursery.start(self._serve_http, t.http_listen)
                if t.udp_listen is not None:
                    addresses["udp"] = await nursery.start(self._serve_udp, t.udp_listen)
                nursery.start_soon(self._housekeeping)
                nursery.start_soon(self._save_periodically)
                ctx.announce(**addresses)
                log.info("tracking on %s", ", ".join(f"{k}={v}" for k, v in addresses.items()))
                task_status.started()
        finally:
            self._save()

    def reload(self, new: TrackerConfig) -> None:
        """Apply a new config: access lists and limits now; listeners need a restart."""
        policy = load_policy(new.access)  # raises ConfigError; the old config stays
        old = self.config.tracker
        if (new.tracker.http_listen, new.tracker.udp_listen) != (old.http_listen, old.udp_listen):
            log.warning("listen addresses changed; they take effect at the next restart")
        t = new.tracker
        self.table.max_torrents = t.max_torrents
        self.table.max_peers_per_torrent = t.max_peers_per_torrent
        self.table.max_peers = t.max_peers
        self.service.section = t
        self.service.access = policy
        self.http.max_request_bytes = t.max_request_bytes
        self.http.idle_timeout = t.header_timeout
        self.http.max_connections = t.max_http_connections
        self.http_slots.cap = t.max_http_connections_per_ip
        if t.save_interval != self.saver.interval:
            self.saver.interval = t.save_interval
            self._saver_scope.cancel()  # the next save is save_interval from now, not from the last
        self.config = new

    # -- listeners -------------------------------------------------------------

    async def _serve_http(self, listen: ListenAddr, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await open_listeners(listen)
        task_status.started(bound_address(listeners[0]))
        # One task per connection; serve_listeners backs off on EMFILE.
        await trio.serve_listeners(self._admit_http, listeners)

    async def _admit_http(self, stream: trio.SocketStream) -> None:
        """Serve one HTTP connection, unless its address already has its share.

        The global cap (max_http_connections) alone lets one address hold
        every slot with idle connections; the per-address cap leaves room
        for the others. A refused connection is closed unread.
        """
        try:
            ip = client_ip(stream.socket.getpeername()[0])
        except OSError:  # reset before we looked
            await trio.aclose_forcefully(stream)
            return
        slot = self.http_slots.acquire(ip)
        if slot is None:
            self.metrics.reject("http", "ip_connection_limit")
            await trio.aclose_forcefully(stream)
            return
        try:
            await self.http(stream)
        finally:
            self.http_slots.release(slot)

    async def _handle_http(self, req: HttpRequest) -> HttpResponse:
        start = time.perf_counter()
        resp = self.service.handle_http(req, trio.current_time())
        self.metrics.latency_by["http"].observe(time.perf_counter() - start)
        return resp

    async def _serve_udp(self, listen: ListenAddr, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Answer BEP 15 datagrams, a batch per wake-up.

        trio's socket methods cost two scheduler checkpoints per call, which
        was most of the per-announce cost under load. Instead the loop waits
        for readability once, then drains up to UDP_BATCH datagrams with
        plain non-blocking calls; waiting again yields to the other tasks, so
        a flood cannot starve HTTP or /metrics. A reply that does not fit the
        socket buffer is dropped (UDP clients retry) and counted.
        """
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.bind((listen.host, listen.port))
            host, port = sock.getsockname()[:2]
            task_status.started(ListenAddr(host, port))
            observe = self.metrics.latency_by["udp"].observe
            handle = self.service.handle_udp
            recvfrom, sendto = sock.recvfrom, sock.sendto
            clock = time.perf_counter
            while True:
                await trio.lowlevel.wait_readable(sock)
                now = trio.current_time()
                for _ in range(UDP_BATCH):
                    try:
                        data, addr = recvfrom(MAX_DATAGRAM)
                    except BlockingIOError:
                        break
                    except OSError as exc:  # an ICMP error for an earlier reply
                        log.debug("udp receive: %s", exc)
                        continue
                    start = clock()
                    reply = handle(data, addr, now)
                    if reply is not None:
                        try:
                            sendto(reply, addr)
                        except OSError as exc:  # BlockingIOError included: buffer full
                            log.debug("udp reply to %s failed: %s", addr, exc)
                            self.metrics.reject("udp", "send_failed")
                    observe(clock() - start)

    async def _save_periodically(self) -> None:
        """The saver's loop, restarted when a reload changes save_interval.

        Its own timer, not the expiry sweep's (up to 60 s), so any interval
        is honoured; a reload from 300 s to 5 s takes effect at once rather
        than after the 300 s sleep in progress.
        """
        while True:
            with self._saver_scope:
                await self.saver.run()
            self._saver_scope = trio.CancelScope()

    async def _housekeeping(self) -> None:
        t = self.config.tracker
        sweep = max(1.0, min(60.0, t.peer_timeout / 4))
        while True:
            await trio.sleep(sweep)
            dropped = self.table.expire(trio.current_time(), self.config.tracker.peer_timeout)
            if dropped:
                self.metrics.expired.inc(dropped)

    # -- state -----------------------------------------------------------------

    def _save(self) -> None:
        if self.saver.save_now():
            log.info("saved %d peers in %d swarms", self.table.peer_count, len(self.table.swarms))

    def _restore(self) -> None:
        try:
            blob = self.state_file.read_bytes()
        except FileNotFoundError:
            return
        now = trio.current_time()
        try:
            n = self.table.restore(blob, now, self.config.tracker.peer_timeout)
        except ValueError as exc:
            aside = self.state_file.with_suffix(".corrupt")
            self.state_file.replace(aside)
            log.error("%s; moved it to %s and starting empty", exc, aside)
            self.table.clear()
            return
        log.info("restored %d peers in %d swarms from %s", n, len(self.table.swarms), self.state_file)


def make_app(ctx: DaemonContext) -> TrackerApp:
    return TrackerApp(ctx)


def check_config(cfg: TrackerConfig) -> None:
    """Validation that needs more than the schema: the access files must load."""
    load_policy(cfg.access)


__all__ = ["TrackerApp", "make_app", "check_config", "ConfigError"]
