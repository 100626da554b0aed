"""The emulated LAN: a network namespace per host, veths into one bridge, shaped with kernel qdiscs.

Layout (run id ``R``, host index ``i``)::

    netns shoal-R            the switch: bridge "lan", one port "sRpI" per host
       sRpI  --veth--  eth0  in netns shoal-R.HOST (address subnet[i + 1])

* upload: a ``tbf`` qdisc on the host's ``eth0`` (its egress into the LAN);
* download: a ``tbf`` qdisc on the switch port (its egress towards the host);
* delay, jitter and loss: the host's delay line (:mod:`shoal.lab.delayline`),
  fed by one ``NFQUEUE`` rule per sender in the host's mangle PREROUTING chain,
  because this kernel has no ``sch_netem``;
* a link down is the switch port set down (the host sees no carrier).

All of it is made with pyroute2 (netlink) except the iptables rules, which are
one ``iptables-restore`` per host. The root namespace gets no address, route or
interface in the lab: a lab host reaches only the lab's subnet (there is no
default route) and its own loopback.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from shoal.lab.scenario import Host, Link, Scenario

__all__ = ["Network", "NETNS_DIR", "enter_netns", "netns_socket", "lab_namespaces", "subnet_conflicts",
           "processes_in", "kill_namespace_processes"]

NETNS_DIR = Path("/run/netns")
T = TypeVar("T")
CLONE_NEWNET = 0x40000000
MIB = 1 << 20
MTU_FRAME = 1514

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_netns(name: str) -> Callable[[], None]:
    """A ``preexec_fn`` that moves the child into namespace ``name`` (and a session of its own)."""
    path = str(NETNS_DIR / name)

    def enter() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)

    return enter


_ns_lock = threading.Lock()


def made_in(name: str, make: Callable[[], T]) -> T:
    """``make()`` called inside namespace ``name``; the calling thread's namespace is restored.

    A socket belongs to the namespace it was made in, for its whole life: a
    netlink socket made here configures that namespace, a TCP socket made here
    reaches the lab's addresses from the root namespace (which has no route
    into the lab). Only this thread moves, and only for the call.
    """
    with _ns_lock:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(str(NETNS_DIR / name), os.O_RDONLY)
        try:
            _setns(target)
            try:
                return make()
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)


def netns_socket(name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket of namespace ``name`` (call it from a worker thread: ``trio.to_thread``)."""
    return made_in(name, lambda: socket.socket(family, kind))


def ns_route(name: str) -> IPRoute:
    """A netlink (rtnetlink) handle on namespace ``name``; close it after use (``with``)."""
    return made_in(name, IPRoute)


_RUN_NS = re.compile(r"^shoal-([0-9a-f]{6})(\.[a-z][a-z0-9-]*)?$")


def lab_namespaces(run_id: str | None = None) -> list[str]:
    """The names of the lab's namespaces on this machine (of one run, or of every run)."""
    if not NETNS_DIR.is_dir():
        return []
    out = []
    for name in os.listdir(NETNS_DIR):
        m = _RUN_NS.match(name)
        if m and (run_id is None or m.group(1) == run_id):
            out.append(name)
    return sorted(out)


def run_of(namespace: str) -> str:
    m = _RUN_NS.match(namespace)
    return m.group(1) if m else ""


def _ns_inode(name: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return None


def processes_in(names: list[str]) -> list[int]:
    """Every process whose network namespace is one of ``names`` (grandchildren too)."""
    inodes = {i for i in (_ns_inode(n) for n in names) if i is not None}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                found.append(int(entry))
        except OSError:
            continue
    return found


def kill_namespace_processes(names: list[str]) -> int:
    """SIGKILL every process in the namespaces, until none is left; returns how many were killed."""
    killed = 0
    for _ in range(100):
        pids = processes_in(names)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        for pid in pids:
            _reap(pid)
    raise RuntimeError(f"processes in {names} survive SIGKILL: {processes_in(names)}")


def _reap(pid: int) -> None:
    """Wait for a killed process to be gone or a zombie; never reap it.

    Its parent reaps it: a process of the lab's own (a daemon, a spawned
    command) is trio's to wait for, and reaping it here would make trio see
    "no such child" and report exit 0 for a process that was killed.
    """
    for _ in range(1000):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if b") Z " in f.read():
                    return
        except OSError:  # gone
            return
        threading.Event().wait(0.001)


def subnet_conflicts(subnet: ipaddress.IPv4Network) -> list[str]:
    """Routes of this (root) namespace that overlap ``subnet``, the default route aside.

    A default route covers every address, so it is not a conflict: what the lab
    refuses is a subnet that the machine already routes somewhere specific.
    """
    out = []
    with IPRoute() as ipr:
        for r in ipr.get_routes(family=socket.AF_INET):
            dst_len = r["dst_len"]
            if dst_len == 0:
                continue
            dst = r.get_attr("RTA_DST")
            net = ipaddress.IPv4Network(f"{dst}/{dst_len}", strict=False)
            if net.overlaps(subnet):
                out.append(str(net))
    return sorted(set(out))


def _write_atomic(path: Path, text: str) -> None:
    """The delay line may re-read its config at any moment: it must never see half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def _tbf(ns: IPRoute, index: int, rate_mib: float, queue: int) -> None:
    """Shape the interface's egress to ``rate_mib`` (0: unshaped), replacing what was there."""
    if rate_mib <= 0:
        with contextlib.suppress(NetlinkError):  # ENOENT: it was unshaped already
            ns.tc("del", index=index, root=True)
        return
    rate = int(rate_mib * MIB)
    # burst: at least a whole GSO packet (64 KiB), so tbf never splits one; 2 ms of rate beyond
    ns.tc("replace", "tbf", index, root=True, rate=f"{rate * 8}bit", burst=65536 + rate // 500,
          limit=queue * MTU_FRAME)


@dataclass
class HostNet:
    host: Host
    netns: str
    port: str  # the switch-side veth
    address: str
    link: Link


class Network:
    """The lab's namespaces, bridge, veths, qdiscs and delay lines for one run."""

    def __init__(self, run_id: str, scenario: Scenario, workdir: Path) -> None:
        self.run_id = run_id
        self.scenario = scenario
        self.workdir = workdir
        self.switch = f"shoal-{run_id}"
        self.hosts = {
            h.name: HostNet(h, f"shoal-{run_id}.{h.name}", f"s{run_id}p{h.index}", scenario.address(h), h.link)
            for h in scenario.hosts
        }
        self.delaylines: dict[str, subprocess.Popen] = {}

    # -- bring up ------------------------------------------------------------------------
    def up(self) -> None:
        conflicts = subnet_conflicts(self.scenario.subnet)
        if conflicts:
            raise ValueError(f"lab subnet {self.scenario.subnet} overlaps this machine's routes: "
                             f"{', '.join(conflicts)}")
        netns.create(self.switch)
        for h in self.hosts.values():
            netns.create(h.netns)
        prefix = self.scenario.subnet.prefixlen
        with ns_route(self.switch) as sw:
            sw.link("add", ifname="lan", kind="bridge")
            bridge = sw.link_lookup(ifname="lan")[0]
            sw.link("set", index=bridge, state="up")
            for h in self.hosts.values():
                sw.link("add", ifname=h.port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": h.netns})
                port = sw.link_lookup(ifname=h.port)[0]
                sw.link("set", index=port, master=bridge, state="up")
                _tbf(sw, port, h.link.download, h.link.queue)
        for h in self.hosts.values():
            with ns_route(h.netns) as ns:
                lo = ns.link_lookup(ifname="lo")[0]
                ns.link("set", index=lo, state="up")
                eth = ns.link_lookup(ifname="eth0")[0]
                ns.addr("add", index=eth, address=h.address, prefixlen=prefix)
                ns.link("set", index=eth, state="up")
                _tbf(ns, eth, h.link.upload, h.link.queue)
        self._start_delaylines()

    def _delay_config(self, receiver: HostNet) -> dict:
        queues = {}
        for sender in self.hosts.values():
            if sender is receiver:
                continue
            a, b = sender.link, receiver.link
            delay = (a.delay + b.delay) / 1000
            jitter = (a.jitter + b.jitter) / 1000
            loss = 1 - (1 - a.loss / 100) * (1 - b.loss / 100)
            queues[str(sender.host.index)] = {"delay": delay, "jitter": jitter, "loss": loss}
        return {"maxlen": 100_000, "seed": self.scenario.seed * 1000 + receiver.host.index, "queues": queues}

    def _needs_line(self, receiver: HostNet) -> bool:
        return any(q["delay"] or q["jitter"] or q["loss"] for q in self._delay_config(receiver)["queues"].values())

    def _start_delaylines(self) -> None:
        import sys

        # One rule per sender: its packets go to the queue of its index. Once a
        # host has a delay line, every sender is queued (a zero-delay queue just
        # passes packets), so a later `link` fault needs no new rules.
        for h in self.hosts.values():
            if not self._needs_line(h):
                continue
            path = self.workdir / f"delayline-{h.host.name}.json"
            rules = ["*mangle"]
            for sender in self.hosts.values():
                if sender is not h:
                    rules.append(f"-A PREROUTING -i eth0 -s {sender.address}/32 -j NFQUEUE "
                                 f"--queue-num {sender.host.index}")
            rules.append("COMMIT")
            # the delay line installs the rules itself, once its queues are bound
            # (a rule without its queue drops packets), so hosts start in parallel
            _write_atomic(path, json.dumps({**self._delay_config(h), "iptables": "\n".join(rules) + "\n"}))
            with open(self.workdir / f"delayline-{h.host.name}.log", "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "shoal.lab.delayline", str(path)],
                                        stdout=subprocess.PIPE, stderr=log,
                                        preexec_fn=enter_netns(h.netns), start_new_session=True)
            self.delaylines[h.host.name] = proc
        for name, proc in self.delaylines.items():
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"the delay line of {name} did not start: "
                                   f"{(self.workdir / f'delayline-{name}.log').read_text().strip()[-300:]}")

    def run_in(self, host: str, argv: list[str], *, input: str | None = None) -> str:
        """Run a short command inside ``host``'s namespace; its stdout, or an error naming its stderr."""
        done = subprocess.run(argv, input=input, capture_output=True, text=True,
                              preexec_fn=enter_netns(self.hosts[host].netns), timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{host}: {' '.join(argv)}: {done.stderr.strip() or done.returncode}")
        return done.stdout

    # -- changes during a run --------------------------------------------------------------
    def set_link(self, host: str, **changes: float) -> Link:
        """Change a host's link (``upload``, ``download``, ``delay``, ``jitter``, ``loss``); returns it."""
        import dataclasses

        h = self.hosts[host]
        h.link = dataclasses.replace(h.link, **changes)
        if "upload" in changes:
            with ns_route(h.netns) as ns:
                _tbf(ns, ns.link_lookup(ifname="eth0")[0], h.link.upload, h.link.queue)
        if "download" in changes:
            with ns_route(self.switch) as sw:
                _tbf(sw, sw.link_lookup(ifname=h.port)[0], h.link.download, h.link.queue)
        if {"delay", "jitter", "loss"} & changes.keys():
            for r in self.hosts.values():
                proc = self.delaylines.get(r.host.name)
                if proc is None:
                    if self._needs_line(r):
                        raise RuntimeError(f"{r.host.name} had no delay on its links at start; give its link a "
                                           "delay above 0 in the scenario to change it during the run")
                    continue
                _write_atomic(self.workdir / f"delayline-{r.host.name}.json", json.dumps(self._delay_config(r)))
                proc.send_signal(signal.SIGHUP)
        return h.link

    def set_carrier(self, host: str, up: bool) -> None:
        """Take a host's link down (its switch port) or bring it back."""
        with ns_route(self.switch) as sw:
            sw.link("set", index=sw.link_lookup(ifname=self.hosts[host].port)[0], state="up" if up else "down")

    def counters(self) -> dict[str, tuple[int, int]]:
        """``host -> (bytes uploaded, bytes downloaded)`` so far, from the switch ports."""
        by_port = switch_counters(self.run_id)
        return {name: by_port[h.port] for name, h in self.hosts.items() if h.port in by_port}

    def failed_delaylines(self) -> list[str]:
        return [name for name, p in self.delaylines.items() if p.poll() is not None]

    # -- tear down -------------------------------------------------------------------------
    def down(self) -> None:
        remove(self.run_id)
        for p in self.delaylines.values():
            if p.stdout:
                p.stdout.close()
            p.wait()


def switch_counters(run_id: str) -> dict[str, tuple[int, int]]:
    """``switch port -> (bytes from the host, bytes to the host)`` of a run's switch."""
    out = {}
    with ns_route(f"shoal-{run_id}") as sw:
        for link in sw.get_links():
            stats = link.get_attr("IFLA_STATS64")
            out[link.get_attr("IFLA_IFNAME")] = (stats["rx_bytes"], stats["tx_bytes"])
    return out


def remove(run_id: str) -> list[str]:
    """Kill every process in the run's namespaces and delete them; returns what was removed."""
    names = lab_namespaces(run_id)
    kill_namespace_processes(names)
    for name in names:
        netns.remove(name)
    return names

