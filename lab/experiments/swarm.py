"""The swarm experiment (seed 001): distribution time from one seed to N hosts, and streaming latency.

Theory of operation
-------------------
The seed host runs the tracker and a peer daemon; every other host that runs
a peer daemon is a leech host, in scenario order. For each N in ``sizes``
and each client in ``clients`` the experiment runs one *distribution*: a fresh
F MiB file (pseudo-random, new per distribution, so a new info-hash and no
cache or tracker entry from before) from the seed to the first N leech hosts,
all of them started at the same moment, and the time each host has the whole
file on disk:

* ``shoal``: the seed's peer daemon gets the torrent with ``shoal peer add``
  (run inside the seed host) and checks its file; once the tracker's scrape
  counts it as a seed, every leech host's peer daemon is told to add the
  torrent at the same moment, through its control socket (the call ``shoal
  peer add`` makes; the CLI itself takes about a second of CPU to start, and
  N of them on two cores would stagger the start by seconds), and each host's
  ``wait`` call returns when its copy is complete.
* ``libtorrent``: the anchor. A libtorrent agent per host
  (:mod:`shoal.lab.agents_swarm`), started and set up first, then all told
  "go" by a signal; each reports when its copy is on disk.
* ``client-server``: every host fetches the file over HTTP from one server
  on the seed host (the same agent, ``serve``), all started together.

The time of a distribution is the last host's. It is compared with the
seed's lower bounds (u_s: the seed host's upload rate, d_min: the slowest
download rate of the N hosts, u_i: their upload rates; an unshaped link is an
infinite rate)::

    client-server  D_cs  >= max(N F / u_s, F / d_min)
    P2P            D_p2p >= max(F / u_s, F / d_min, N F / (u_s + sum u_i))

Between distributions every torrent is removed (or its agents stopped) and
every copy deleted, so each one starts from one seed. Correctness: each copy
is compared (SHA-256) with the original, for every client and every N.

Streaming (``stream = true``): a fresh file whose torrent names a web seed
(``url-list``: the HTTP server on the seed host, the CDN) is seeded by the
seed's daemon and downloaded by ``stream_peers`` leech hosts; then, on each
of ``stream_trials`` other leech hosts, one after another, the torrent is
added and ``stream`` called for a reader at ``stream_kbps`` (Spotify's
320 kbit/s by default), and the experiment measures the time until the first
second of audio (the first ``rate`` bytes) is on disk and correct -- the
seed's playback latency, which Spotify puts at about 250 ms. Then the host
finishes the file and it, too, is checked whole.

Everything is one table (one row per client and N: the last host's time,
the bound, the ratio; one row for streaming), one plot of time against N
(``swarm.png``) and ``results.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from shoal.daemons.runtime.config import setting
from shoal.daemons.runtime.rpc import RpcClient, RpcError, connect_unix
from shoal.demo.realclients import SharedFile, make_shared_file
from shoal.lab.experiment import Result
from shoal.lab.lab import Lab, LabError
from shoal.protocol import bencode
from shoal.protocol.peer_control import AddTorrent, StreamTorrent, TorrentRef, WaitTorrent

__all__ = ["Params", "run", "bounds", "CLIENTS", "SPOTIFY_LATENCY"]

CLIENTS = ("shoal", "libtorrent", "client-server")
SPOTIFY_LATENCY = 0.250  # s: the seed's "~250 ms playback latency on average"
MIB = 1 << 20
HTTP_PORT = 8080  # the seed host's file server (client-server baseline, web seed)
SETUP_TIMEOUT = 60.0  # s for a seed to check its file and be known to the tracker, an agent to start
AGENT = [sys.executable, "-m", "shoal.lab.agents_swarm"]


@dataclass(frozen=True, slots=True)
class Params:
    file_mib: float = setting(16.0, min=0.0625, max=4096.0, help="F: the file distributed, MiB")
    sizes: tuple[int, ...] = setting((4, 8), help="the numbers of leech hosts N, one distribution each")
    clients: tuple[str, ...] = setting(CLIENTS, help="which of shoal, libtorrent, client-server to run")
    piece_kib: int = setting(64, min=16, max=16384, help="the torrents' piece length, KiB (a power of two)")
    timeout: float = setting(300.0, min=1.0, max=86_400.0, help="s one distribution may take before it fails")
    seed: str = setting("", help="the seed host; empty: the host that runs the tracker")
    stream: bool = setting(True, help="also measure streaming latency (needs shoal among the clients)")
    stream_mib: float = setting(8.0, min=0.0625, max=4096.0, help="the streamed track, MiB")
    stream_kbps: int = setting(320, min=8, max=100_000, help="the reader's rate, kbit/s (Spotify's best: 320)")
    stream_peers: int = setting(2, min=0, max=1000, help="leech hosts that hold the track before streaming")
    stream_trials: int = setting(2, min=1, max=1000, help="hosts that stream it, one after another")

    def __post_init__(self) -> None:
        if not self.sizes or any(n < 1 for n in self.sizes):
            raise ValueError(f"sizes: {list(self.sizes)}: one or more host counts, each at least 1")
        if not self.clients or any(c not in CLIENTS for c in self.clients):
            raise ValueError(f"clients: {list(self.clients)}: choose among {', '.join(CLIENTS)}")
        if len(set(self.clients)) != len(self.clients):
            raise ValueError("clients: a client is listed twice")
        if self.piece_kib & (self.piece_kib - 1):
            raise ValueError(f"piece_kib: {self.piece_kib} is not a power of two")
        if self.stream and "shoal" not in self.clients:
            raise ValueError("stream: streaming is shoal's; add \"shoal\" to clients or set stream = false")


def bounds(f_mib: float, n: int, u_s: float, uploads: Sequence[float], downloads: Sequence[float]) -> dict:
    """The seed's lower bounds on distribution time, seconds; a rate of 0 is an unshaped (infinite) link."""
    def rate(r: float) -> float:
        return math.inf if r <= 0 else r

    u_s, d_min = rate(u_s), min(rate(d) for d in downloads)
    total_up = u_s + sum(rate(u) for u in uploads)
    return {"client-server": max(n * f_mib / u_s, f_mib / d_min),
            "p2p": max(f_mib / u_s, f_mib / d_min, n * f_mib / total_up)}


@dataclass
class Distribution:
    client: str
    n: int
    bound: float
    times: dict[str, float] = field(default_factory=dict)  # host -> s from the start to its copy complete
    identical: dict[str, bool] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def last(self) -> float | None:
        return max(self.times.values()) if len(self.times) == self.n else None


class Lines:
    """JSON lines from an agent's stdout."""

    def __init__(self, proc: trio.Process, what: str) -> None:
        assert proc.stdout is not None
        self.stream, self.what, self.buf = proc.stdout, what, b""

    async def next(self) -> dict:
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise LabError(f"{self.what} exited without a word (see the run's logs)")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        event = json.loads(line)
        if event.get("event") == "error":
            raise LabError(f"{self.what}: {event.get('message')}")
        return event


class Swarm:
    def __init__(self, lab: Lab, params: Params) -> None:
        self.lab, self.p = lab, params
        s = lab.scenario
        trackers = s.running("tracker")
        if not trackers:
            raise LabError(f"{s.source}: the swarm experiment needs a host that runs the tracker")
        self.seed = params.seed or trackers[0].name
        if "peer" not in s.host(self.seed).daemons:
            raise LabError(f"{s.source}: the seed host {self.seed} runs no peer daemon")
        self.leeches = [h.name for h in s.hosts if h.name != self.seed and "peer" in h.daemons]
        need = max(params.sizes)
        if params.stream:
            need = max(need, params.stream_peers + 1)
        if len(self.leeches) < need:
            raise LabError(f"{s.source}: {len(self.leeches)} leech hosts (hosts with a peer daemon other than "
                           f"{self.seed}); the parameters need {need}")
        self.announce = f"http://{lab.bundle.plan(self.seed, 'tracker').ports['http']}/announce"
        self.root = lab.workdir / "swarm"
        self.www = self.root / "www"
        self.www.mkdir(parents=True)
        self.base_url = f"http://{lab.address(self.seed)}:{HTTP_PORT}"
        self.rounds = 0
        self.procs: list[trio.Process] = []
        self.server: trio.Process | None = None

    # -- helpers ---------------------------------------------------------------------------
    def socket(self, host: str) -> Path:
        return Path(self.lab.daemons[(host, "peer")].env["STATE_DIRECTORY"]) / "control.sock"

    async def rpc(self, host: str) -> RpcClient:
        return await connect_unix(self.socket(host))

    async def agent(self, host: str, args: list[str], name: str) -> tuple[trio.Process, Lines]:
        proc = await self.lab.spawn(host, [*AGENT, *args], name=name, stdout=subprocess.PIPE)
        self.procs.append(proc)
        return proc, Lines(proc, f"{host}/{name}")

    async def stop(self, proc: trio.Process) -> None:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
        self.procs.remove(proc)

    def new_file(self, f_mib: float, name: str) -> SharedFile:
        self.rounds += 1
        return make_shared_file(self.www / f"r{self.rounds}", name, int(f_mib * MIB), self.announce,
                                piece_length=self.p.piece_kib * 1024, seed=self.lab.scenario.seed * 1000 + self.rounds)

    def dest(self, host: str, shared: SharedFile) -> Path:
        return self.root / "hosts" / host / shared.path.parent.name

    async def seeded(self, info_hash: bytes) -> None:
        """Until the tracker counts a seed of ``info_hash`` (so the first leech to announce is told of it)."""
        http = self.lab.bundle.plan(self.seed, "tracker").ports["http"]
        addr, _, port = http.rpartition(":")
        path = "/scrape?info_hash=" + urllib.parse.quote_from_bytes(info_hash)
        with trio.move_on_after(SETUP_TIMEOUT) as scope:
            while True:
                reply = bencode.decode(await self.lab.http_get(self.seed, addr, int(port), path))
                assert isinstance(reply, dict)
                files = reply.get(b"files", {})
                if files.get(info_hash, {}).get(b"complete", 0) >= 1:
                    return
                await trio.sleep(0.1)  # polling the tracker's state, bounded by the deadline above
        if scope.cancelled_caught:
            raise LabError(f"the tracker on {self.seed} counted no seed of {info_hash.hex()} in {SETUP_TIMEOUT:g}s")

    async def start_server(self) -> None:
        listen = f"{self.lab.address(self.seed)}:{HTTP_PORT}"
        self.server, lines = await self.agent(self.seed, ["serve", str(self.www), listen], "fileserver")
        with trio.fail_after(SETUP_TIMEOUT):
            await lines.next()

    async def shoal_seed(self, torrent: Path, folder: Path, info_hash: bytes) -> None:
        """``shoal peer add`` on the seed host, then until its daemon has checked the file and announced it."""
        await self.lab.exec(self.seed, [*self.lab.shoal, "peer", "add", str(torrent), "--dest", str(folder),
                                        "--socket", str(self.socket(self.seed))])
        async with await self.rpc(self.seed) as c:
            status = await c.call("wait", WaitTorrent(info_hash.hex()).encode(), timeout=SETUP_TIMEOUT)
        if status["left"] != 0:
            raise LabError(f"{self.seed}: the seed's copy in {folder} does not check")
        await self.seeded(info_hash)

    async def shoal_remove(self, hosts: list[str], info_hash: bytes) -> None:
        async def one(h: str) -> None:
            async with await self.rpc(h) as c:
                await c.call("remove", TorrentRef(info_hash.hex()).encode())

        async with trio.open_nursery() as nursery:
            for h in hosts:
                nursery.start_soon(one, h)

    async def complete(self, c: RpcClient, info_hash: bytes, pieces: int | None = None) -> dict:
        """The daemon's ``wait`` until complete (or ``pieces`` verified), across its per-call time limit."""
        while True:
            try:
                return await c.call("wait", WaitTorrent(info_hash.hex(), pieces=pieces).encode(), timeout=60)
            except RpcError as exc:
                if exc.code != "timeout":
                    raise

    # -- the distributions -----------------------------------------------------------------
    async def distribute(self, client: str, n: int) -> Distribution:
        s = self.lab.scenario
        hosts = self.leeches[:n]
        b = bounds(self.p.file_mib, n, s.host(self.seed).link.upload, [s.host(h).link.upload for h in hosts],
                   [s.host(h).link.download for h in hosts])
        d = Distribution(client, n, b["client-server" if client == "client-server" else "p2p"])
        shared = self.new_file(self.p.file_mib, f"file{self.rounds + 1}.bin")
        self.lab.progress(f"{client} N={n}: {self.p.file_mib:g} MiB from {self.seed} (bound {d.bound:.1f}s)")
        run = {"shoal": self.shoal_round, "libtorrent": self.libtorrent_round,
               "client-server": self.http_round}[client]
        try:
            await run(d, shared, hosts)
        finally:
            for h in hosts:
                shutil.rmtree(self.dest(h, shared), ignore_errors=True)
            shutil.rmtree(shared.path.parent, ignore_errors=True)
        return d

    def done(self, d: Distribution, host: str, t: float) -> None:
        d.times[host] = t
        self.lab.progress(f"{d.client} N={d.n}: {host} complete at {t:.2f}s ({len(d.times)}/{d.n})")

    async def check_copies(self, d: Distribution, shared: SharedFile, path: Callable[[str], Path]) -> None:
        want = await trio.to_thread.run_sync(_sha256, shared.path)
        for h in d.times:
            got = await trio.to_thread.run_sync(_sha256, path(h))
            d.identical[h] = got == want
            if got != want:
                d.errors[h] = f"sha256 {got[:12]} is not the original's {want[:12]}"

    async def timed(self, d: Distribution, start: Callable[[trio.Nursery, float], None], pids: list[int]) -> None:
        """Run ``start(nursery, t0)``'s tasks with the distribution's deadline; who did not finish is an error.

        ``pids`` are the client's processes (seed's included): their CPU time over the distribution is recorded.
        """
        before = await trio.to_thread.run_sync(self.lab.net.counters)
        cpu0 = _cpu_seconds(pids)
        with trio.move_on_after(self.p.timeout) as scope:
            async with trio.open_nursery() as nursery:
                start(nursery, time.monotonic())
        after = await trio.to_thread.run_sync(self.lab.net.counters)
        d.info["cpu_s"] = _cpu_seconds(pids) - cpu0
        if d.times:
            # How busy each host's uplink was over the distribution: where the time went.
            s, span = self.lab.scenario, max(d.times.values())
            d.info["uplink_busy"] = {h: (after[h][0] - before[h][0]) / span / (s.host(h).link.upload * MIB)
                                     for h in [self.seed, *self.leeches[:d.n]] if s.host(h).link.upload > 0}
        if scope.cancelled_caught:
            for h in self.leeches[:d.n]:
                if h not in d.times:
                    d.errors.setdefault(h, f"not complete after {self.p.timeout:g}s (params.timeout)")

    async def shoal_round(self, d: Distribution, shared: SharedFile, hosts: list[str]) -> None:
        await self.shoal_seed(shared.torrent, shared.path.parent, shared.info_hash)
        raw = shared.torrent.read_bytes()
        clients = {h: await self.rpc(h) for h in hosts}  # connected before the start, so the start is one call each

        async def leech(h: str, t0: float) -> None:
            c = clients[h]
            dest = self.dest(h, shared)
            dest.mkdir(parents=True)
            await c.call("add", AddTorrent(torrent=raw, dest=str(dest)).encode())
            status = await self.complete(c, shared.info_hash)
            if status["left"] == 0:
                self.done(d, h, time.monotonic() - t0)

        def start(nursery: trio.Nursery, t0: float) -> None:
            for h in hosts:
                nursery.start_soon(leech, h, t0)

        try:
            pids = [pid for h in [self.seed, *hosts] if (pid := self.lab.daemons[(h, "peer")].pid) is not None]
            await self.timed(d, start, pids)
            up = {}
            for h in [self.seed, *hosts]:
                async with await self.rpc(h) as c:
                    rows = [r for r in await c.call("status") if r["info_hash"] == shared.info_hash.hex()]
                up[h] = rows[0]["uploaded"] if rows else 0
            d.info["seed_copies"] = up[self.seed] / shared.size
            d.info["uploaded_bytes"] = up
        finally:
            for c in clients.values():
                await c.aclose()
            await self.shoal_remove([self.seed, *hosts], shared.info_hash)
        await self.check_copies(d, shared, lambda h: self.dest(h, shared) / shared.path.name)

    async def libtorrent_round(self, d: Distribution, shared: SharedFile, hosts: list[str]) -> None:
        seed, seed_lines = await self.agent(
            self.seed, ["libtorrent", str(shared.torrent), str(shared.path.parent), "--ip",
                        self.lab.address(self.seed), "--seed", "--timeout", str(SETUP_TIMEOUT)], "lt-seed")
        agents: dict[str, tuple[trio.Process, Lines]] = {}
        try:
            with trio.fail_after(SETUP_TIMEOUT):
                await seed_lines.next()
                await self.seeded(shared.info_hash)
                for h in hosts:
                    dest = self.dest(h, shared)
                    dest.mkdir(parents=True)
                    agents[h] = await self.agent(h, ["libtorrent", str(shared.torrent), str(dest), "--ip",
                                                     self.lab.address(h), "--timeout", str(self.p.timeout)], "lt")
                for _, lines in agents.values():
                    await lines.next()  # ready: waiting for the go
            await self.go(d, agents, [seed])
        finally:
            for proc, _ in [*agents.values(), (seed, seed_lines)]:
                await self.stop(proc)
        await self.check_copies(d, shared, lambda h: self.dest(h, shared) / shared.path.name)

    async def http_round(self, d: Distribution, shared: SharedFile, hosts: list[str]) -> None:
        url = f"{self.base_url}/{shared.path.parent.name}/{shared.path.name}"
        agents: dict[str, tuple[trio.Process, Lines]] = {}
        try:
            with trio.fail_after(SETUP_TIMEOUT):
                for h in hosts:
                    dest = self.dest(h, shared) / shared.path.name
                    agents[h] = await self.agent(h, ["http", url, str(dest), "--timeout", str(self.p.timeout)], "http")
                for _, lines in agents.values():
                    await lines.next()
            await self.go(d, agents, [self.server])
        finally:
            for proc, _ in agents.values():
                await self.stop(proc)
        await self.check_copies(d, shared, lambda h: self.dest(h, shared) / shared.path.name)

    async def go(self, d: Distribution, agents: dict[str, tuple[trio.Process, Lines]],
                 others: Sequence[trio.Process | None] = ()) -> None:
        """Signal every agent at once; each says when its copy is complete (on its own clock, the same one)."""
        async def one(h: str, lines: Lines, t0: float) -> None:
            try:
                event = await lines.next()
            except LabError as exc:
                d.errors[h] = str(exc)
                return
            self.done(d, h, event["t"] - t0)

        def start(nursery: trio.Nursery, t0: float) -> None:
            for h, (proc, lines) in agents.items():
                proc.send_signal(signal.SIGUSR1)
                nursery.start_soon(one, h, lines, t0)

        procs = [*others, *(proc for proc, _ in agents.values())]
        await self.timed(d, start, [p.pid for p in procs if p is not None])

    # -- streaming -------------------------------------------------------------------------
    async def streaming(self, result: Result) -> dict:
        p = self.p
        rate = p.stream_kbps * 1000 // 8  # bytes/s of the reader
        shared = self.new_file(p.stream_mib, "track.bin")
        url = f"{self.base_url}/{shared.path.parent.name}/{shared.path.name}"
        torrent = shared.path.parent / "track-webseed.torrent"
        # The track's torrent with the CDN in its url-list, made with the CLI on the seed host.
        await self.lab.exec(self.seed, [*self.lab.shoal, "peer", "create", str(shared.path), "--tracker",
                                        self.announce, "--web-seed", url, "-o", str(torrent),
                                        "--piece-length", str(p.piece_kib * 1024)])
        raw = torrent.read_bytes()
        from shoal.protocol.metainfo import parse_metainfo

        meta = parse_metainfo(raw)
        peers = self.leeches[:p.stream_peers]
        trials = self.leeches[p.stream_peers:p.stream_peers + p.stream_trials]
        self.lab.progress(f"stream: a {p.stream_mib:g} MiB track on {self.seed}, the CDN and {len(peers)} peers; "
                          f"{len(trials)} hosts play it at {p.stream_kbps} kbit/s")
        want = shared.path.read_bytes()
        prefix = want[:rate]
        out: dict[str, Any] = {"rate_bytes": rate, "peers": peers, "trials": []}
        used = [self.seed, *peers]
        try:
            await self.shoal_seed(torrent, shared.path.parent, meta.info_hash)
            with trio.fail_after(p.timeout):
                async with trio.open_nursery() as nursery:
                    for h in peers:
                        nursery.start_soon(self._fetch_whole, h, raw, meta.info_hash, shared)
            for h in trials:
                used.append(h)
                trial = await self._stream_one(h, raw, meta.info_hash, shared, rate, prefix, want)
                out["trials"].append(trial)
                result.check(f"stream on {h}: the first playable second and then the whole track are identical",
                             trial["identical"], f"first second after {trial['latency_s'] * 1000:.0f} ms from add "
                             f"({trial['from_stream_s'] * 1000:.0f} ms from the stream call), "
                             f"{trial['webseed_bytes']} bytes from the CDN; whole track "
                             + ("identical" if trial["identical"] else "DIFFERS"))
        finally:
            await self.shoal_remove(used, meta.info_hash)
            for h in used[1:]:
                shutil.rmtree(self.dest(h, shared), ignore_errors=True)
            shutil.rmtree(shared.path.parent, ignore_errors=True)
        return out

    async def _fetch_whole(self, h: str, raw: bytes, info_hash: bytes, shared: SharedFile) -> None:
        dest = self.dest(h, shared)
        dest.mkdir(parents=True)
        async with await self.rpc(h) as c:
            await c.call("add", AddTorrent(torrent=raw, dest=str(dest)).encode())
            await self.complete(c, info_hash)

    async def _stream_one(self, h: str, raw: bytes, info_hash: bytes, shared: SharedFile, rate: int,
                          prefix: bytes, want: bytes) -> dict:
        dest = self.dest(h, shared)
        dest.mkdir(parents=True)
        path = dest / shared.path.name
        first_pieces = -(-len(prefix) // shared.piece_length)
        webseed_before = _sample(await self.lab.metrics(h, "peer"), "shoal_peer_webseed_bytes_total")
        with trio.fail_after(self.p.timeout):
            async with await self.rpc(h) as c:
                t0 = time.monotonic()
                await c.call("add", AddTorrent(torrent=raw, dest=str(dest)).encode())
                t_stream = time.monotonic()
                await c.call("stream", StreamTorrent(info_hash.hex(), rate=float(rate)).encode())
                n = first_pieces
                while True:  # until the first second is on disk and right (deadlined pieces come first)
                    status = await self.complete(c, info_hash, pieces=n)
                    if await trio.to_thread.run_sync(_read, path, len(prefix)) == prefix:
                        break
                    n = status["have"] + 1
                t1 = time.monotonic()
                await self.complete(c, info_hash)
        got = await trio.to_thread.run_sync(path.read_bytes)
        webseed = _sample(await self.lab.metrics(h, "peer"), "shoal_peer_webseed_bytes_total") - webseed_before
        latency = t1 - t0
        self.lab.progress(f"stream: {h} plays after {latency * 1000:.0f} ms")
        return {"host": h, "latency_s": latency, "from_stream_s": t1 - t_stream, "pieces_first_second": first_pieces,
                "identical": got == want, "webseed_bytes": int(webseed), "size": len(want)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(MIB):
                h.update(chunk)
    except FileNotFoundError:
        return "missing"
    return h.hexdigest()


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (those gone count 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return total / tick


def _read(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except FileNotFoundError:
        return b""


def _sample(text: str, name: str) -> float:
    """The sum of a metric's samples in a /metrics page (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def plot(path: Path, dists: list[Distribution], f_mib: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"shoal": ("o-", "C0"), "libtorrent": ("s-", "C1"), "client-server": ("^-", "C2")}
    for client in CLIENTS:
        pts = [(d.n, d.last) for d in dists if d.client == client and d.last is not None]
        if pts:
            marker, color = styles[client]
            ax.plot([n for n, _ in pts], [t for _, t in pts], marker, color=color, label=f"{client} (last host)")
    for kind, style, label in (("p2p", "--", "P2P bound"), ("client-server", ":", "client-server bound")):
        pts = sorted({(d.n, d.bound) for d in dists if (d.client == "client-server") == (kind == "client-server")})
        if pts:
            ax.plot([n for n, _ in pts], [b for _, b in pts], style, color="grey", label=label)
    ax.set_xlabel("N (leech hosts)")
    ax.set_ylabel("distribution time, s")
    ax.set_yscale("log")
    ax.set_xticks(sorted({d.n for d in dists}))
    ax.set_title(f"Distributing {f_mib:g} MiB from one seed (seed 001)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def run(lab: Lab, params: Params) -> Result:
    result = Result()
    sw = Swarm(lab, params)
    dists: list[Distribution] = []
    try:
        await sw.start_server()
        for n in params.sizes:
            for client in params.clients:
                dists.append(await sw.distribute(client, n))
        stream = await sw.streaming(result) if params.stream else None
    finally:
        for proc in list(sw.procs):
            await sw.stop(proc)
    for d in dists:
        last = d.last
        result.rows.append({"client": d.client, "N": d.n, "last host s": last if last is not None else "-",
                            "median s": statistics.median(d.times.values()) if d.times else "-",
                            "bound": "client-server" if d.client == "client-server" else "P2P",
                            "bound s": d.bound, "x bound": last / d.bound if last is not None and d.bound else "-"})
        ok = len(d.times) == d.n and all(d.identical.get(h) for h in d.times) and not d.errors
        bad = "; ".join(f"{h}: {e}" for h, e in sorted(d.errors.items()))
        result.check(f"{d.client} N={d.n}: every copy is byte-identical to the original", ok,
                     f"{sum(d.identical.values())}/{d.n} identical (sha256)" + (f"; {bad}" if bad else ""))
    if stream is not None and stream["trials"]:
        lat = [t["latency_s"] for t in stream["trials"]]
        med = statistics.median(lat)
        result.rows.append({"client": "shoal stream", "N": len(stream["peers"]) + 1, "last host s": med,
                            "median s": med, "bound": "Spotify ~250 ms", "bound s": SPOTIFY_LATENCY,
                            "x bound": med / SPOTIFY_LATENCY})
    by = {(d.client, d.n): d.last for d in dists}
    result.data = {
        "seed": sw.seed, "file_mib": params.file_mib,
        "links": {h.name: {"upload": h.link.upload, "download": h.link.download, "delay": h.link.delay}
                  for h in lab.scenario.hosts},
        "distributions": [{"client": d.client, "n": d.n, "bound_s": d.bound, "last_s": d.last,
                           "x_bound": d.last / d.bound if d.last is not None and d.bound else None,
                           "times": d.times, "identical": d.identical, "errors": d.errors, **d.info}
                          for d in dists],
        "shoal_over_libtorrent": {n: sh / lt for n in params.sizes
                                  if (lt := by.get(("libtorrent", n))) and (sh := by.get(("shoal", n)))},
        "stream": stream,
        "spotify_latency_s": SPOTIFY_LATENCY,
    }
    if lab.out is not None and dists:
        png = lab.out / "swarm.png"
        await trio.to_thread.run_sync(plot, png, dists, params.file_mib)
        result.plots.append(png)
    result.series = {"peer_payload_bytes_per_s": "sum by (host, direction) (rate(shoal_peer_bytes_total[5s]))"}
    return result
