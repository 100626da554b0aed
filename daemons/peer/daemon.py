"""The peer daemon: a Session, its torrent library, and a local control socket.

Torrents added through the control socket are kept in
``$STATE_DIRECTORY/torrents/<info-hash>.torrent`` (with the destination in a
``.dest`` file beside it), written atomically, so a restart picks every
torrent up again; the storage's resume data then spares a re-hash.

Control RPC (the runtime's transport on a Unix socket, mode 0600):

* ``add {"torrent": bytes, "dest": str | None}`` -> ``{"info_hash", "name", "state"}``
* ``add {"magnet": str, "dest": str | None}`` -> the same, state ``metadata``
  while the info dictionary is fetched from peers (BEP 9); the link is kept
  as ``<info-hash>.magnet`` until then, so a restart goes on fetching
* ``status {}`` -> ``[{...per-torrent status...}]``
* ``remove {"info_hash": hex}`` -> ``{"removed": bool}``
* ``limits {"info_hash": hex, "upload_rate": n, "download_rate": n}`` -> status:
  the torrent's own limits, bytes/s, 0 = none (``add`` takes the same two keys);
  kept as ``<info-hash>.limits`` in the library
* ``stream {"info_hash": hex, "rate": bytes/s, "offset": n?}`` -> ``{"pieces": n}``:
  deadline mode from byte ``offset`` (default 0) for a reader at ``rate``
* ``wait {"info_hash": hex, "pieces": n?}`` -> status once the torrent is
  complete, or has n verified pieces (bounded by the RPC request timeout;
  call again to keep waiting)
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import trio

from shoal.daemons.peer.config import PeerConfig
from shoal.daemons.peer.metadata import NoSource, fetch_and_add
from shoal.daemons.peer.session import Session
from shoal.daemons.runtime.daemon import DaemonContext
from shoal.daemons.runtime.rpc import RpcError, RpcServer, handlers_of, rpc_method
from shoal.daemons.runtime.state import atomic_write
from shoal.protocol.contract import BadParams
from shoal.protocol.errors import RemoteProtocolError
from shoal.protocol.metainfo import Magnet, parse_magnet, parse_metainfo
from shoal.protocol.peer_control import AddTorrent, Limits, StreamTorrent, TorrentRef, WaitTorrent

log = logging.getLogger("shoal.peer")

class PeerApp:
    def __init__(self, ctx: DaemonContext) -> None:
        cfg: PeerConfig = ctx.config
        self.ctx = ctx
        state = ctx.state_dir
        download_dir = Path(cfg.peer.download_dir) if cfg.peer.download_dir else state / "downloads"
        self.session = Session(cfg, ctx.registry, download_dir, state / "resume")
        self.library = state / "torrents"
        self.control_path = Path(cfg.peer.control_socket) if cfg.peer.control_socket else state / "control.sock"
        # magnet links whose metadata is being fetched: info-hash -> (link, done event, cancel scope)
        self.fetching: dict[bytes, tuple[Magnet, trio.Event, trio.CancelScope]] = {}
        # magnet links that have no source left: info-hash -> (link, why); status shows them
        self.stuck: dict[bytes, tuple[Magnet, str]] = {}

    async def run(self, ctx: DaemonContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.library.mkdir(mode=0o700, exist_ok=True)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            listen = await nursery.start(self.session.run)
            if listen is not None:
                ctx.announce(peer=listen)
            await self._restore()
            server = RpcServer(handlers_of(self), metrics=ctx.metrics, name="peer")
            await nursery.start(partial(server.serve_unix, str(self.control_path)))
            log.info("control socket %s", self.control_path)
            task_status.started()

    def reload(self, new: PeerConfig) -> None:
        """Rate limits apply at once; listen address and limits on connections at restart."""
        if new.peer.listen != self.ctx.config.peer.listen:
            log.warning("peer.listen changed; it takes effect at the next restart")
        self.session.upload_throttle.set_rate(new.limits.upload_rate)
        self.session.download_throttle.set_rate(new.limits.download_rate)
        self.session.config = new

    async def _restore(self) -> None:
        for path in sorted(self.library.glob("*.torrent")):
            try:
                meta = parse_metainfo(path.read_bytes())
            except (OSError, RemoteProtocolError) as exc:
                log.error("skipping %s: %s", path, exc)
                continue
            dest, up, down = self._options(path)
            await self.session.add(meta, dest, upload_rate=up, download_rate=down)
            log.info("resumed %s", meta.name)
        for path in sorted(self.library.glob("*.magnet")):
            try:
                magnet = parse_magnet(path.read_text())
            except (OSError, UnicodeDecodeError, RemoteProtocolError) as exc:
                log.error("skipping %s: %s", path, exc)
                continue
            self._start_fetch(magnet, *self._options(path))

    def _options(self, path: Path) -> tuple[Path | None, int, int]:
        """A library entry's destination and own rate limits (up, down)."""
        dest_file, limits_file = path.with_suffix(".dest"), path.with_suffix(".limits")
        dest = Path(dest_file.read_text()) if dest_file.exists() else None
        try:
            up, down = (int(x) for x in limits_file.read_text().split()) if limits_file.exists() else (0, 0)
        except ValueError:
            log.error("%s: not two integers; no per-torrent limits", limits_file)
            up, down = 0, 0
        return dest, up, down

    def _save_options(self, stem: Path, dest: str | None, up: int, down: int) -> None:
        if dest is not None:
            atomic_write(stem.with_suffix(".dest"), dest.encode())
        if up or down:
            atomic_write(stem.with_suffix(".limits"), f"{up} {down}\n".encode())
        else:
            stem.with_suffix(".limits").unlink(missing_ok=True)

    def _forget(self, stem: Path) -> None:
        for suffix in (".torrent", ".magnet", ".dest", ".limits"):
            stem.with_suffix(suffix).unlink(missing_ok=True)

    def _start_fetch(self, magnet: Magnet, dest: Path | None, up: int = 0, down: int = 0) -> None:
        done, scope = trio.Event(), trio.CancelScope()
        self.fetching[magnet.info_hash] = (magnet, done, scope)
        self.nursery.start_soon(self._fetch_then_add, magnet, dest, up, down, done, scope)

    async def _fetch_then_add(self, magnet: Magnet, dest: Path | None, up: int, down: int, done: trio.Event,
                              scope: trio.CancelScope) -> None:
        stem = self.library / magnet.info_hash.hex()

        def keep(fetched) -> None:
            atomic_write(stem.with_suffix(".torrent"), fetched.torrent)
            stem.with_suffix(".magnet").unlink(missing_ok=True)
            log.info("fetched the metadata of %s (%d bytes)", fetched.meta.name, len(fetched.meta.raw_info))

        self.stuck.pop(magnet.info_hash, None)
        try:
            with scope:
                try:
                    await fetch_and_add(self.session, magnet, dest, upload_rate=up, download_rate=down,
                                        on_fetched=keep)
                except NoSource as exc:
                    # Kept in the library: a restart (or adding it again) tries again.
                    log.error("magnet %s: %s", magnet.info_hash.hex(), exc)
                    self.stuck[magnet.info_hash] = (magnet, str(exc))
                except (ValueError, OSError) as exc:
                    log.error("cannot start %s: %s", magnet.display_name or magnet.info_hash.hex(), exc)
        finally:
            del self.fetching[magnet.info_hash]
            done.set()

    # -- control RPC ------------------------------------------------------------------

    @rpc_method("add", AddTorrent)
    async def rpc_add(self, params: AddTorrent) -> dict:
        dest, up, down = params.dest, params.upload_rate, params.download_rate
        if params.magnet is not None:
            return self._add_magnet(params.magnet, dest, up, down)
        raw = params.torrent
        assert raw is not None  # AddTorrent wants one of the two
        try:
            meta = parse_metainfo(raw)
        except RemoteProtocolError as exc:
            raise RpcError("bad_torrent", str(exc)) from None
        running = self.session.torrents.get(meta.info_hash)
        if running is not None:
            return {"info_hash": meta.info_hash.hex(), "name": meta.name, "state": running.state, "already": True}
        stem = self.library / meta.info_hash.hex()
        atomic_write(stem.with_suffix(".torrent"), raw)
        self._save_options(stem, dest, up, down)
        try:
            torrent = await self.session.add(meta, Path(dest) if dest else None, upload_rate=up, download_rate=down)
        except (ValueError, OSError) as exc:
            self._forget(stem)
            raise RpcError("refused", str(exc)) from None
        return {"info_hash": meta.info_hash.hex(), "name": meta.name, "state": torrent.state}

    def _add_magnet(self, uri: str, dest: str | None, up: int, down: int) -> dict:
        try:
            magnet = parse_magnet(uri)
        except RemoteProtocolError as exc:
            raise RpcError("bad_magnet", str(exc)) from None
        if not magnet.trackers and not magnet.peers:
            raise RpcError("bad_magnet", "the magnet link names no tracker (tr=) and no peer (x.pe=): "
                                         "nothing to fetch it from (there is no DHT)")
        name = magnet.display_name or magnet.info_hash.hex()
        torrent = self.session.torrents.get(magnet.info_hash)
        if torrent is not None:
            return {"info_hash": magnet.info_hash.hex(), "name": torrent.meta.name, "state": torrent.state,
                    "already": True}
        if magnet.info_hash in self.fetching:
            return {"info_hash": magnet.info_hash.hex(), "name": name, "state": "metadata", "already": True}
        if len(self.session.torrents) + len(self.fetching) >= self.ctx.config.peer.max_torrents:
            raise RpcError("refused", f"already {self.ctx.config.peer.max_torrents} torrents (peer.max_torrents)")
        stem = self.library / magnet.info_hash.hex()
        atomic_write(stem.with_suffix(".magnet"), uri.encode())
        self._save_options(stem, dest, up, down)
        self._start_fetch(magnet, Path(dest) if dest else None, up, down)
        return {"info_hash": magnet.info_hash.hex(), "name": name, "state": "metadata"}

    @rpc_method("status")
    async def rpc_status(self) -> list:
        rows = [t.status() for t in self.session.torrents.values()]
        waiting: list[tuple[bytes, Magnet, str, str | None]] = [
            (ih, m, "metadata", None) for ih, (m, _done, _scope) in self.fetching.items()]
        waiting += [(ih, m, "error", why) for ih, (m, why) in self.stuck.items() if ih not in self.fetching]
        for info_hash, magnet, state, why in waiting:
            row = {
                "info_hash": info_hash.hex(), "name": magnet.display_name or info_hash.hex(), "state": state,
                "size": 0, "pieces": 0, "have": 0, "peers": 0, "uploaded": 0, "downloaded": 0,
                "down_rate": 0.0, "up_rate": 0.0, "left": 0, "path": "", "eta": None,
                "upload_limit": 0, "download_limit": 0,
            }
            if why:
                row["error"] = why
            rows.append(row)
        return rows

    @rpc_method("wait", WaitTorrent)
    async def rpc_wait(self, params: WaitTorrent) -> dict:
        """Until the torrent is complete, or has at least ``pieces`` verified pieces."""
        info_hash = params.digest
        if info_hash in self.fetching:
            await self.fetching[info_hash][1].wait()
        torrent = self.session.torrents.get(info_hash)
        if torrent is None:
            raise RpcError("not_found", "no such torrent")
        pieces = params.pieces
        if pieces is None:
            await torrent.completed.wait()
        else:
            while torrent.storage.num_verified < pieces and not torrent.completed.is_set():
                await torrent.piece_verified.wait()
        return torrent.status()

    @rpc_method("stream", StreamTorrent)
    async def rpc_stream(self, params: StreamTorrent) -> dict:
        torrent = self.session.torrents.get(params.digest)
        if torrent is None:
            raise RpcError("not_found", "no such torrent")
        try:
            return {"pieces": torrent.stream(params.offset, params.rate)}
        except ValueError as exc:
            raise BadParams(str(exc)) from None

    @rpc_method("limits", Limits)
    async def rpc_limits(self, params: Limits) -> dict:
        info_hash = params.digest
        torrent = self.session.torrents.get(info_hash)
        if torrent is None:
            raise RpcError("not_found", "no such torrent")
        up, down = params.upload_rate, params.download_rate
        torrent.set_limits(up, down)
        self._save_options(self.library / info_hash.hex(), None, up, down)
        return torrent.status()

    @rpc_method("remove", TorrentRef)
    async def rpc_remove(self, params: TorrentRef) -> dict:
        info_hash = params.digest
        removed = self.session.remove(info_hash)
        if info_hash in self.fetching:
            self.fetching[info_hash][2].cancel()
            removed = True
        if self.stuck.pop(info_hash, None) is not None:
            removed = True
        self._forget(self.library / info_hash.hex())
        return {"removed": removed}


def make_app(ctx: DaemonContext) -> PeerApp:
    return PeerApp(ctx)

