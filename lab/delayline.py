"""The delay line: one process per lab host, holding its incoming packets for the links' delay.

The kernel here has no ``sch_netem``, so the lab adds delay, jitter and loss
in user space through nfnetlink_queue (:mod:`shoal.protocol.nfqueue`): in the
host's namespace an iptables rule per sender queues the packets that sender's
address sends to this host (queue number = sender's host index), and this
process accepts each one once ``delay`` has passed, or drops it with
probability ``loss`` on arrival. The delay of a queue is the sender's link
delay plus this host's (one way across both links); jitter draws uniformly in
``+-jitter`` and never reorders a queue (a packet leaves no earlier than the
one before it), so TCP sees variable delay, not reordering (under dense traffic the mean
delay therefore rises above ``delay``, towards ``delay + jitter``).

Only metadata crosses to user space, one batch verdict releases every packet
due in a queue, so the cost is per batch, not per byte. Rates are the
kernel's business (tbf qdiscs on the veths, :mod:`shoal.lab.net`).

Config is a JSON file::

    {"maxlen": 10000, "seed": 7,
     "queues": {"3": {"delay": 0.010, "jitter": 0.0, "loss": 0.0}, ...},
     "iptables": "*mangle\n-A PREROUTING ... -j NFQUEUE --queue-num 3\nCOMMIT\n"}

The rules are installed (``iptables-restore``) once every queue is bound: a
rule whose queue nobody holds would drop the host's packets.

SIGHUP re-reads it (a ``link`` fault changes delay or loss this way). Once
every queue is bound the process prints ``ready`` on stdout. It never lets a
packet through undelayed: if it dies, the rules (without ``--queue-bypass``)
drop the host's traffic, and the lab stops the run as failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.protocol import nfqueue

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
RCVBUF = 32 << 20  # packets arriving while Python is busy wait here, not in ENOBUFS


@dataclass(slots=True)
class QueueState:
    delay: float
    jitter: float
    loss: float
    held: collections.deque  # (release time, packet id), in arrival order
    last_release: float = 0.0
    accepted: int = 0
    dropped: int = 0


def load(path: Path) -> dict:
    return json.loads(path.read_text())


class DelayLine:
    def __init__(self, config: dict) -> None:
        self.rng = random.Random(config.get("seed", 0))
        self.maxlen = int(config.get("maxlen", 10000))
        self.queues: dict[int, QueueState] = {}
        self.configure(config)

    def configure(self, config: dict) -> None:
        for key, q in config["queues"].items():
            n = int(key)
            state = self.queues.get(n)
            if state is None:
                state = self.queues[n] = QueueState(0.0, 0.0, 0.0, collections.deque())
            state.delay, state.jitter, state.loss = float(q["delay"]), float(q["jitter"]), float(q["loss"])

    def arrive(self, queue: int, packet_id: int, now: float) -> bool:
        """Hold a packet; False means drop it now (lost on the wire)."""
        q = self.queues.get(queue)
        if q is None:  # a queue this line does not hold: nothing to delay
            return True
        if q.loss and self.rng.random() < q.loss:
            q.dropped += 1
            return False
        release = now + q.delay + (self.rng.uniform(-q.jitter, q.jitter) if q.jitter else 0.0)
        release = max(release, q.last_release)
        q.last_release = release
        q.held.append((release, packet_id))
        return True

    def due(self, now: float) -> list[tuple[int, int]]:
        """``(queue, last id)`` for every queue with packets due by ``now``."""
        out = []
        for n, q in self.queues.items():
            last = None
            while q.held and q.held[0][0] <= now:
                last = q.held.popleft()[1]
                q.accepted += 1
            if last is not None:
                out.append((n, last))
        return out

    def next_due(self) -> float | None:
        times = [q.held[0][0] for q in self.queues.values() if q.held]
        return min(times) if times else None


def serve(path: Path) -> int:
    line = DelayLine(load(path))
    # A packet's delay is only as exact as this process is prompt: run it ahead
    # of ordinary processes (the lowest real-time priority; it sleeps in select,
    # and the kernel's RT throttling keeps a runaway from starving the machine).
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError as exc:
        print(f"delayline: running without real-time priority ({exc.strerror}); delays may overshoot under load",
              file=sys.stderr)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    decoder = nfqueue.Decoder()
    for seq, n in enumerate(sorted(line.queues)):
        sock.send(nfqueue.bind(n, maxlen=line.maxlen, seq=2 * seq))
    pending_acks = 2 * len(line.queues)
    while pending_acks:
        for ev in decoder.feed(sock.recv(nfqueue.MAX_MESSAGE)):
            if isinstance(ev, nfqueue.Ack):
                if ev.error:
                    print(f"delayline: binding queue failed: {os.strerror(-ev.error)}", file=sys.stderr)
                    return 1
                pending_acks -= 1
    rules = load(path).get("iptables")
    if rules:
        done = subprocess.run(["iptables-restore"], input=rules, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            print(f"delayline: iptables-restore: {done.stderr.strip()}", file=sys.stderr)
            return 1
    reload = False

    def on_hup(_sig, _frame) -> None:
        nonlocal reload
        reload = True

    stop = False

    def on_term(_sig, _frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the lab stops us, not the terminal's Ctrl-C
    print("ready", flush=True)
    sock.setblocking(False)
    overruns = 0
    while not stop:
        if reload:
            reload = False
            line.configure(load(path))
        now = time.monotonic()
        for n, last in line.due(now):
            sock.send(nfqueue.verdict_batch(n, last, nfqueue.ACCEPT))
        nxt = line.next_due()
        timeout = None if nxt is None else max(0.0, nxt - time.monotonic())
        try:
            readable, _, _ = select.select([sock], [], [], timeout)
        except InterruptedError:
            continue
        if reload:
            # SIGHUP's handler ran inside select, which Python then resumed (PEP 475):
            # the packet that woke us is the first of the new settings. (Checked only at
            # the loop's top, it took the old delay: a connect right after a link fault
            # measured 11.6 ms where the new delay made 30.)
            reload = False
            line.configure(load(path))
        if not readable:
            continue
        while True:
            try:
                data = sock.recv(nfqueue.MAX_MESSAGE)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: notifications lost; their packets go with the next batch
                overruns += 1
                print(f"delayline: {exc.strerror}", file=sys.stderr)
                break
            now = time.monotonic()
            for ev in decoder.feed(data):
                if isinstance(ev, nfqueue.Packet) and not line.arrive(ev.queue, ev.packet_id, now):
                    sock.send(nfqueue.verdict(ev.queue, ev.packet_id, nfqueue.DROP))
    # Stopping: let everything held go now rather than drop it.
    for n, last in line.due(float("inf")):
        sock.send(nfqueue.verdict_batch(n, last, nfqueue.ACCEPT))
    stats = {n: {"accepted": q.accepted, "dropped": q.dropped} for n, q in line.queues.items()}
    print(json.dumps({"stats": stats, "overruns": overruns}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shoal-lab-delayline")
    p.add_argument("config", type=Path)
    args = p.parse_args(argv)
    return serve(args.config)


if __name__ == "__main__":
    raise SystemExit(main())
