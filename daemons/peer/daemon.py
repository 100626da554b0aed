"""The peer daemon: a Session, its torrent library, and a local control socket.

Torrents added through the control socket are kept in
``$STATE_DIRECTORY/torrents/<info-hash>.torrent`` (with the destination in a
``.dest`` file beside it), written atomically, so a restart picks every
torrent up again; the storage's resume data then spares a re-hash.

Control RPC (the runtime's transport on a Unix socket, mode 0600):

* ``add {"torrent": bytes, "dest": str | None}`` -> ``{"info_hash", "name"}``
* ``status {}`` -> ``[{...per-torrent status...}]``
* ``remove {"info_hash": hex}`` -> ``{"removed": bool}``
* ``wait {"info_hash": hex, "pieces": n?}`` -> status once the torrent is
  complete, or has n verified pieces (bounded by the RPC request timeout;
  call again to keep waiting)
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import trio

from shoal.protocol.errors import RemoteProtocolError
from shoal.protocol.metainfo import parse_metainfo

from ..runtime.daemon import DaemonContext
from ..runtime.rpc import RpcError, RpcServer
from ..runtime.state import atomic_write
from .config import PeerConfig
from .session import Session

log = logging.getLogger("shoal.peer")

# A .torrent sent over the control socket; the RPC frame bound (1 MiB) caps it too.
MAX_TORRENT_BYTES = 1 << 20


class PeerApp:
    def __init__(self, ctx: DaemonContext) -> None:
        cfg: PeerConfig = ctx.config
        self.ctx = ctx
        state = ctx.state_dir
        download_dir = Path(cfg.peer.download_dir) if cfg.peer.download_dir else state / "downloads"
        self.session = Session(cfg, ctx.registry, download_dir, state / "resume")
        self.library = state / "torrents"
        self.control_path = Path(cfg.peer.control_socket) if cfg.peer.control_socket else state / "control.sock"

    async def run(self, ctx: DaemonContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.library.mkdir(mode=0o700, exist_ok=True)
        async with trio.open_nursery() as nursery:
            listen = await nursery.start(self.session.run)
            if listen is not None:
                ctx.announce(peer=listen)
            await self._restore()
            server = RpcServer(
                {"add": self.rpc_add, "status": self.rpc_status, "remove": self.rpc_remove,
                 "wait": self.rpc_wait},
                metrics=ctx.metrics, name="peer",
            )
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
            dest_file = path.with_suffix(".dest")
            dest = Path(dest_file.read_text()) if dest_file.exists() else None
            await self.session.add(meta, dest)
            log.info("resumed %s", meta.name)

    # -- control RPC ------------------------------------------------------------------

    async def rpc_add(self, params) -> dict:
        if not isinstance(params, dict):
            raise RpcError("bad_params", "expected {torrent: bytes, dest: str|null}")
        if "magnet" in params:
            raise RpcError("unsupported", "magnet links need BEP 9 metadata exchange, which this daemon does not do yet")
        raw, dest = params.get("torrent"), params.get("dest")
        if not isinstance(raw, bytes) or len(raw) > MAX_TORRENT_BYTES:
            raise RpcError("bad_params", "torrent must be the bytes of a .torrent file")
        if dest is not None and (not isinstance(dest, str) or not Path(dest).is_absolute()):
            raise RpcError("bad_params", "dest must be an absolute path")
        try:
            meta = parse_metainfo(raw)
        except RemoteProtocolError as exc:
            raise RpcError("bad_torrent", str(exc)) from None
        stem = self.library / meta.info_hash.hex()
        atomic_write(stem.with_suffix(".torrent"), raw)
        if dest is not None:
            atomic_write(stem.with_suffix(".dest"), dest.encode())
        try:
            torrent = await self.session.add(meta, Path(dest) if dest else None)
        except (ValueError, OSError) as exc:
            stem.with_suffix(".torrent").unlink(missing_ok=True)
            stem.with_suffix(".dest").unlink(missing_ok=True)
            raise RpcError("refused", str(exc)) from None
        return {"info_hash": meta.info_hash.hex(), "name": meta.name, "state": torrent.state}

    async def rpc_status(self, params) -> list:
        return [t.status() for t in self.session.torrents.values()]

    async def rpc_wait(self, params) -> dict:
        """Until the torrent is complete, or has at least ``pieces`` verified pieces."""
        torrent = self.session.torrents.get(_info_hash(params))
        if torrent is None:
            raise RpcError("not_found", "no such torrent")
        pieces = params.get("pieces")
        if pieces is None:
            await torrent.completed.wait()
        elif not isinstance(pieces, int):
            raise RpcError("bad_params", "pieces must be an integer")
        else:
            while torrent.storage.num_verified < pieces and not torrent.completed.is_set():
                await torrent.piece_verified.wait()
        return torrent.status()

    async def rpc_remove(self, params) -> dict:
        info_hash = _info_hash(params)
        removed = self.session.remove(info_hash)
        stem = self.library / info_hash.hex()
        stem.with_suffix(".torrent").unlink(missing_ok=True)
        stem.with_suffix(".dest").unlink(missing_ok=True)
        return {"removed": removed}


def _info_hash(params) -> bytes:
    try:
        info_hash = bytes.fromhex(params["info_hash"])
    except (TypeError, KeyError, ValueError):
        raise RpcError("bad_params", "expected {info_hash: hex}") from None
    if len(info_hash) != 20:
        raise RpcError("bad_params", "an info-hash is 20 bytes (40 hex digits)")
    return info_hash


def make_app(ctx: DaemonContext) -> PeerApp:
    return PeerApp(ctx)

