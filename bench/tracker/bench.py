"""Tracker throughput: announces per second over UDP and HTTP keep-alive.

    .venv/bin/python bench/tracker/bench.py [--seconds 10] [--compare opentracker]

The tracker under test runs alone on CPU 0 (the issue's "one core"); the load
generator runs on CPU 1 with plain non-blocking sockets, so it costs far less
per request than any tracker and the server stays the bottleneck. 10,000
simulated peers in 100 torrents are announced first (event=started), then
the clients re-announce random peers (event none, numwant=50) as fast as the
tracker answers:

* UDP: one socket per client, a window of requests in flight (BEP 15 connect
  first, then announces);
* HTTP: one keep-alive connection per client, one request in flight on each.
  A tracker that closes the connection after each reply (opentracker) is
  reconnected, which is part of its cost.

With --compare opentracker, Debian's opentracker (C) is measured in the same
run with the same load and whitelist, and the table gives shoal's figures as
a ratio of it. Results are printed and saved as JSON beside this file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from urllib.parse import quote_from_bytes

from common import start_daemon  # noqa: E402  (bench/common.py)

HERE = Path(__file__).resolve().parent
TORRENTS = 100
PEERS = 10_000
SERVER_CPU, CLIENT_CPU = 0, 1
PROTOCOL_ID = 0x41727101980


def info_hash(t: int) -> bytes:
    return struct.pack(">I", t) + b"\x5a" * 16


def peer_id(p: int) -> bytes:
    return b"-BN0001-" + p.to_bytes(12, "big")


def torrent_of(p: int) -> int:
    return p % TORRENTS


# -- load generators (run in child processes on CLIENT_CPU) ---------------------


def udp_worker(addr, seconds: float, window: int, first: int, count: int, started: bool, out) -> None:
    os.sched_setaffinity(0, {CLIENT_CPU})
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(addr)
    s.settimeout(2.0)
    s.send(struct.pack(">QII", PROTOCOL_ID, 0, 1))
    action, _tid, cid = struct.unpack(">IIQ", s.recv(64)[:16])
    assert action == 0, "connect failed"
    event = 2 if started else 0
    packets = [
        struct.pack(">QII20s20sqqqIIIiH", cid, 1, i, info_hash(torrent_of(p)), peer_id(p), 0, 0,
                    0 if p % 4 == 0 else 1 << 20, event, 0, 0, 50, 10000 + p % 50000)
        for i, p in enumerate(range(first, first + count))
    ]
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    done = errors = 0
    outstanding = 0
    i = 0
    deadline = time.perf_counter() + seconds
    if started:  # announce each peer exactly once
        deadline = float("inf")
    while time.perf_counter() < deadline and (not started or done < count):
        while outstanding < window and (not started or i < count):
            s.send(packets[i % count] if not started else packets[i])
            i += 1
            outstanding += 1
        if not sel.select(1.0):
            outstanding = 0  # lost: refill the window
            if started:
                i = done  # resend what was not answered
            continue
        while True:
            try:
                data = s.recv(4096)
            except BlockingIOError:
                break
            outstanding -= 1
            if data[:4] == b"\x00\x00\x00\x01":
                done += 1
            else:
                errors += 1
    out.put(("udp", done, errors))


def http_worker(addr, seconds: float, conns: int, first: int, count: int, out) -> None:
    os.sched_setaffinity(0, {CLIENT_CPU})
    host = f"{addr[0]}:{addr[1]}".encode()
    requests = [
        b"GET /announce?info_hash=%s&peer_id=%s&port=%d&uploaded=0&downloaded=0&left=%d&compact=1"
        b"&numwant=50 HTTP/1.1\r\nHost: %s\r\n\r\n"
        % (quote_from_bytes(info_hash(torrent_of(p))).encode(), quote_from_bytes(peer_id(p)).encode(),
           10000 + p % 50000, 0 if p % 4 == 0 else 1 << 20, host)
        for p in range(first, first + count)
    ]
    sel = selectors.DefaultSelector()
    done = errors = reconnects = 0
    rng = random.Random(first)

    def open_conn():
        c = socket.create_connection(addr)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.setblocking(False)
        state = {"buf": b""}
        sel.register(c, selectors.EVENT_READ, state)
        c.send(requests[rng.randrange(count)])

    for _ in range(conns):
        open_conn()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for key, _ in sel.select(1.0):
            c, state = key.fileobj, key.data
            try:
                data = c.recv(65536)
            except (BlockingIOError, ConnectionResetError):
                data = b"" if not isinstance(sys.exc_info()[1], BlockingIOError) else None
            if data is None:
                continue
            buf = state["buf"] + data
            head_end = buf.find(b"\r\n\r\n")
            closed = data == b""
            if head_end >= 0:
                head = buf[:head_end].lower()
                n = head.find(b"content-length:")
                length = int(head[n + 15:].split(b"\r\n", 1)[0]) if n >= 0 else None
                body_len = len(buf) - head_end - 4
                if length is not None and body_len >= length or (length is None and closed):
                    if buf.startswith(b"HTTP/1.1 200") or buf.startswith(b"HTTP/1.0 200"):
                        done += 1
                    else:
                        errors += 1
                    keep = length is not None and b"connection: close" not in head and not closed
                    if keep:
                        state["buf"] = buf[head_end + 4 + length:]
                        c.send(requests[rng.randrange(count)])
                        continue
                    sel.unregister(c)
                    c.close()
                    reconnects += 1
                    open_conn()
                    continue
            if closed:
                sel.unregister(c)
                c.close()
                reconnects += 1
                open_conn()
                continue
            state["buf"] = buf
    out.put(("http", done, errors, reconnects))


# -- servers (pinned to SERVER_CPU) ---------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Shoal:
    name = "shoal"

    def __init__(self, tmp: Path, whitelist: Path) -> None:
        cfg = tmp / "tracker.toml"
        cfg.write_text(f"""
[daemon]
log_level = "warning"
metrics_listen = "127.0.0.1:0"
state_directory = "{tmp / 'state'}"
[tracker]
http_listen = "127.0.0.1:0"
udp_listen = "127.0.0.1:0"
peer_timeout = 7200
numwant_max = 200
max_request_bytes = 4096
# Every load-generating connection comes from 127.0.0.1.
max_http_connections_per_ip = 1024
[access]
mode = "whitelist"
whitelist_file = "{whitelist}"
rate_limit = 0.0
""")
        self.proc, addrs = start_daemon("tracker", cfg, tmp, cpu=SERVER_CPU)
        self.udp = addrs["udp"]
        self.http = addrs["http"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class OpenTracker:
    name = "opentracker"

    def __init__(self, tmp: Path, whitelist: Path) -> None:
        port = _free_port()
        self.udp = self.http = ("127.0.0.1", port)
        self.proc = subprocess.Popen(
            ["opentracker", "-i", "127.0.0.1", "-p", str(port), "-P", str(port), "-w", str(whitelist),
             "-d", str(tmp), "-u", "nobody"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CPU}),
        )
        # Ready when it answers a BEP 15 connect.
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.2)
        for _ in range(100):
            s.sendto(struct.pack(">QII", PROTOCOL_ID, 0, 1), self.udp)
            try:
                s.recv(64)
                break
            except OSError:
                continue
        else:
            raise RuntimeError("opentracker did not answer")
        s.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the run ----------------------------------------------------------------------


def run_phase(target, fn, args_for, workers: int):
    out = mp.Queue()
    procs = [mp.Process(target=fn, args=(*args_for(w), out)) for w in range(workers)]
    cpu0 = cpu_seconds(target.proc.pid)
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    return results, elapsed, cpu_seconds(target.proc.pid) - cpu0


def measure(cls, tmp: Path, whitelist: Path, seconds: float, clients: int, window: int) -> dict:
    server = cls(tmp, whitelist)
    per = PEERS // clients
    try:
        # Populate: every peer announces "started" once, over UDP.
        results, elapsed, _ = run_phase(
            server, udp_worker, lambda w: (server.udp, 0, window, w * per, per, True), clients)
        populated = sum(r[1] for r in results)
        row = {"tracker": cls.name, "peers": populated, "torrents": TORRENTS}
        results, elapsed, cpu = run_phase(
            server, udp_worker, lambda w: (server.udp, seconds, window, w * per, per, False), clients)
        done = sum(r[1] for r in results)
        row["udp_announces_per_s"] = done / elapsed
        row["udp_errors"] = sum(r[2] for r in results)
        row["udp_server_cpu_per_announce_us"] = cpu / max(done, 1) * 1e6
        row["udp_server_core_utilisation"] = cpu / elapsed
        results, elapsed, cpu = run_phase(
            server, http_worker, lambda w: (server.http, seconds, 8, w * per, per), clients)
        done = sum(r[1] for r in results)
        row["http_announces_per_s"] = done / elapsed
        row["http_errors"] = sum(r[2] for r in results)
        row["http_reconnects"] = sum(r[3] for r in results)
        row["http_server_cpu_per_announce_us"] = cpu / max(done, 1) * 1e6
        row["http_server_core_utilisation"] = cpu / elapsed
        return row
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4, help="load-generator processes (all on CPU 1)")
    ap.add_argument("--window", type=int, default=32, help="UDP requests in flight per client")
    ap.add_argument("--compare", choices=["opentracker", "none"], default="opentracker")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    args = ap.parse_args()
    if os.cpu_count() < 2:
        print("needs 2 CPUs: one for the tracker, one for the load", file=sys.stderr)
        return 2
    kinds = [Shoal]
    if args.compare == "opentracker":
        if not shutil.which("opentracker"):
            print("opentracker missing: apt-get install opentracker (or --compare none)", file=sys.stderr)
            return 2
        kinds.append(OpenTracker)
    rows = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmpname:
        tmp = Path(tmpname)
        whitelist = tmp / "whitelist.txt"
        whitelist.write_text("".join(info_hash(t).hex() + "\n" for t in range(TORRENTS)))
        os.chmod(tmp, 0o755)
        os.chmod(whitelist, 0o644)
        for cls in kinds:
            sub = tmp / cls.name
            sub.mkdir()
            os.chmod(sub, 0o755)
            rows.append(measure(cls, sub, whitelist, args.seconds, args.clients, args.window))
    print(f"{'tracker':<12} {'peers':>6} {'UDP ann/s':>10} {'µs CPU/ann':>10} {'HTTP ann/s':>11} {'µs CPU/ann':>10}")
    for r in rows:
        print(f"{r['tracker']:<12} {r['peers']:>6} {r['udp_announces_per_s']:>10.0f} "
              f"{r['udp_server_cpu_per_announce_us']:>10.1f} {r['http_announces_per_s']:>11.0f} "
              f"{r['http_server_cpu_per_announce_us']:>10.1f}")
    result = {"command": " ".join(["bench/tracker/bench.py", *sys.argv[1:]]), "seconds": args.seconds,
              "clients": args.clients, "udp_window": args.window, "rows": rows,
              "targets": {"udp_announces_per_s": 10_000, "http_announces_per_s": 3_000}}
    if len(rows) == 2:
        ratio = {k: rows[0][k] / rows[1][k] for k in ("udp_announces_per_s", "http_announces_per_s")}
        result["shoal_over_opentracker"] = ratio
        print(f"shoal / opentracker: UDP {ratio['udp_announces_per_s']:.2f}x, "
              f"HTTP {ratio['http_announces_per_s']:.2f}x")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
