"""Real third-party BitTorrent clients, driven for the demo, interop tests and benchmarks.

* :class:`LibtorrentClient`: a libtorrent 2.x session (PyPI ``libtorrent``)
  inside this process, on its own loopback address.
* :class:`Aria2Client`: an ``aria2c`` process (Debian ``aria2``).

Both are set up for loopback work: no DHT, LSD, UPnP, NAT-PMP, uTP or
encryption, and several connections per IP allowed. Neither is part of a
daemon; they exist so that Shoal is always checked against software it did
not write.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.protocol.metainfo import create_single_file, hash_pieces

ARIA2C = "aria2c"


@dataclass(frozen=True)
class SharedFile:
    path: Path
    torrent: Path
    info_hash: bytes
    size: int
    piece_length: int
    pieces: bytes

    def torrent_for(self, announce: str, dest: Path, *, announce_list: list[list[str]] | None = None) -> Path:
        """Another .torrent for the same file (same info-hash) with other trackers."""
        meta, info_hash = create_single_file(
            self.path.name, self.size, self.piece_length, self.pieces, announce, announce_list=announce_list
        )
        assert info_hash == self.info_hash
        dest.write_bytes(meta)
        return dest


def make_shared_file(
    directory: Path, name: str, size: int, announce: str, *, piece_length: int = 256 * 1024,
    announce_list: list[list[str]] | None = None, seed: int = 1,
) -> SharedFile:
    """Write ``size`` pseudo-random bytes to ``directory/name`` and a .torrent beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    data = _pseudo_random(size, seed)
    path = directory / name
    path.write_bytes(data)
    pieces = hash_pieces(data, piece_length)
    meta, info_hash = create_single_file(name, size, piece_length, pieces, announce, announce_list=announce_list)
    torrent = directory / f"{name}.torrent"
    torrent.write_bytes(meta)
    return SharedFile(path, torrent, info_hash, size, piece_length, pieces)


def _pseudo_random(size: int, seed: int) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


class LibtorrentClient:
    """One libtorrent session listening on ``ip`` (a 127.0.0.0/8 address)."""

    def __init__(self, ip: str = "127.0.0.1", *, name: str = "lt", **settings) -> None:
        import libtorrent as lt

        self.lt = lt
        self.ip = ip
        self.name = name
        # A plain dict works at run time; libtorrent's stubs only know settings_pack.
        pack: Any = {
            "listen_interfaces": f"{ip}:0",
            "outgoing_interfaces": ip,
            "enable_dht": False,
            "dht_bootstrap_nodes": "",
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "in_enc_policy": 2,  # pe_disabled
            "out_enc_policy": 2,
            "allow_multiple_connections_per_ip": True,
            # libtorrent otherwise refuses loopback trackers whose path
            # does not start with /announce (passkey URLs don't).
            "ssrf_mitigation": False,
            "announce_to_all_tiers": True,
            "alert_mask": lt.alert.category_t.status_notification
            | lt.alert.category_t.tracker_notification
            | lt.alert.category_t.error_notification
            | lt.alert.category_t.storage_notification,  # cache_flushed_alert
            **settings,
        }
        self.session = lt.session(pack)
        self.handles: list = []
        # What the alerts said so far (alert objects die at the next pop). A torrent is
        # "finished" once its data is on disk too: libtorrent says finished when every piece
        # passed its hash check, possibly before its disk threads wrote the last blocks out,
        # and a test that hashes the file then can read stale zeros.
        self.finished: set[bytes] = set()
        self._flushing: set[bytes] = set()
        self.tracker_replies: dict[bytes, int] = {}
        self.errors: list[str] = []

    @property
    def port(self) -> int:
        return self.session.listen_port()

    def add(self, torrent: Path, save_path: Path, *, seed: bool = False):
        lt = self.lt
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(str(torrent))
        params.save_path = str(save_path)
        if seed:
            params.flags |= lt.torrent_flags.seed_mode
        handle = self.session.add_torrent(params)
        self.handles.append(handle)
        return handle

    def add_magnet(self, uri: str, save_path: Path):
        """Add a magnet link: libtorrent fetches the info dictionary from peers (BEP 9)."""
        params = self.lt.parse_magnet_uri(uri)
        params.save_path = str(save_path)
        handle = self.session.add_torrent(params)
        self.handles.append(handle)
        return handle

    def _drain(self) -> None:
        lt = self.lt
        for a in self.session.pop_alerts():
            if isinstance(a, lt.torrent_finished_alert):
                self._flushing.add(_v1(a.handle))
                a.handle.flush_cache()
            elif isinstance(a, lt.cache_flushed_alert) and _v1(a.handle) in self._flushing:
                self._flushing.discard(_v1(a.handle))
                self.finished.add(_v1(a.handle))
            elif isinstance(a, lt.tracker_reply_alert):
                ih = _v1(a.handle)
                self.tracker_replies[ih] = self.tracker_replies.get(ih, 0) + 1
            elif isinstance(a, (lt.tracker_error_alert, lt.torrent_error_alert, lt.file_error_alert)):
                self.errors.append(a.message())

    def wait_until(self, condition, timeout: float) -> bool:
        """Block until ``condition()`` holds, woken by libtorrent's alerts.

        Meant for ``trio.to_thread.run_sync``. Returns False on timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            if condition():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.session.wait_for_alert(max(1, int(min(left, 0.5) * 1000)))

    def replies(self, handle) -> int:
        """Tracker replies this torrent has had."""
        self._drain()
        return self.tracker_replies.get(_v1(handle), 0)

    def progress(self, handle) -> tuple[float, bool]:
        """(fraction done, finished) of one torrent."""
        st = handle.status()
        return st.progress, st.is_seeding or st.is_finished

    def close(self) -> None:
        for h in self.handles:
            self.session.remove_torrent(h)
        self.handles.clear()
        # Dropping the last reference stops the session (and sends stopped announces).
        del self.session


def _v1(handle) -> bytes:
    return bytes(handle.info_hashes().v1.to_bytes())


def aria2_available() -> bool:
    return shutil.which(ARIA2C) is not None


def aria2_argv(torrent: Path, directory: Path, *, seed: bool, ip: str = "127.0.0.1",
               seed_time_min: float = 0.0, listen_port: int | None = None) -> list[str]:
    """The aria2c command line for a loopback swarm (see shared/notes/bittorrent-peers.md)."""
    argv = [
        ARIA2C,
        f"--dir={directory}",
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=false",
        "--bt-require-crypto=false",
        "--bt-min-crypto-level=plain",
        "--seed-ratio=0.0",
        f"--seed-time={seed_time_min}",
        "--file-allocation=none",
        "--check-integrity=false",
        "--console-log-level=warn",
        "--summary-interval=0",
        "--quiet=true",
        f"--interface={ip}",
        "--disable-ipv6=true",
        "--bt-tracker-connect-timeout=5",
        "--bt-tracker-timeout=5",
    ]
    if listen_port:
        argv.append(f"--listen-port={listen_port}")
    if seed:
        argv += ["--bt-seed-unverified=true"]
    argv.append(str(torrent))
    return argv


class Aria2Client:
    """An aria2c process; it exits 0 once done (and seeded ``seed_time_min`` minutes)."""

    def __init__(self, torrent: Path, directory: Path, *, seed: bool, ip: str = "127.0.0.1",
                 seed_time_min: float = 0.0, log: Path | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.argv = aria2_argv(torrent, directory, seed=seed, ip=ip, seed_time_min=seed_time_min)
        # The child keeps its own copy of the log's descriptor; ours is closed at once.
        with open(log, "wb") if log else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def poll(self) -> int | None:
        return self.proc.poll()

    async def wait(self) -> int:
        """Wait for aria2c to exit, from trio; cancellable (the thread is abandoned)."""
        import trio

        return await trio.to_thread.run_sync(self.proc.wait, abandon_on_cancel=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def loopback_ip(n: int) -> str:
    """The n-th test address in 127.0.0.0/8 (Linux routes all of it to lo)."""
    if not 1 <= n <= 250:
        raise ValueError("n must be 1..250")
    return f"127.0.0.{n + 1}"


__all__ = [
    "SharedFile", "make_shared_file", "LibtorrentClient", "Aria2Client", "aria2_available",
    "aria2_argv", "loopback_ip",
]
