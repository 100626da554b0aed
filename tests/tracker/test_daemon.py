"""The tracker daemon as systemd runs it: a subprocess on real sockets.

Bad input over HTTP and UDP is refused and counted by reason while the daemon
keeps serving; a graceful restart keeps the swarm; a kill -9 in the middle of
an announce storm leaves a tracker that starts and serves again.
"""

import os
import signal
import socket
import struct

import trio
from prometheus_client.parser import text_string_to_metric_families

from shoal.daemons.peer.announce import HttpTracker, TrackerUrl, UdpTracker, http_get
from shoal.daemons.tracker.swarm import SwarmTable
from shoal.protocol import udp_tracker as udp_wire
from shoal.protocol.tracker import Announce, AnnounceResponse, Event, Failure

from .conftest import free_udp_port, next_host, start_tracker, write_config

IH_A = b"\xaa" * 20
IH_B = b"\xbb" * 20


def ann(n: int, ih: bytes = IH_A, left: int = 100, event: Event = Event.STARTED) -> Announce:
    return Announce(info_hash=ih, peer_id=b"-TS0001-" + n.to_bytes(12, "big"), port=10000 + n,
                    uploaded=0, downloaded=0, left=left, event=event)


def http(d) -> HttpTracker:
    a = d.addresses["http"]
    return HttpTracker(TrackerUrl("http", a.host, a.port, "/announce"), timeout=5)


def udp(d) -> UdpTracker:
    a = d.addresses["udp"]
    return UdpTracker(TrackerUrl("udp", a.host, a.port, "/announce"), base_timeout=0.5, retries=2)


async def metrics(d) -> dict[tuple[str, tuple], float]:
    a = d.addresses["metrics"]
    status, body = await http_get(a.host, a.port, b"/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }


def rejected(m, protocol: str) -> dict[str, float]:
    return {
        dict(labels)["reason"]: v
        for (name, labels), v in m.items()
        if name == "shoal_tracker_rejected_total" and dict(labels)["protocol"] == protocol and v
    }


async def raw_http(addr, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream(addr.host, addr.port)
    async with stream:
        await stream.send_all(data)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
    return out


async def test_bad_input_is_refused_counted_and_the_daemon_keeps_serving(config):
    with trio.fail_after(60):
        async with await start_tracker(config) as d:
            h = d.addresses["http"]
            # HTTP: a malformed announce gets a bencoded failure.
            status, body = await http_get(h.host, h.port, b"/announce?info_hash=short&port=x")
            assert status == 200 and body.startswith(b"d14:failure reason")
            # Oversized request line, garbage instead of HTTP, wrong path, wrong method.
            big = await raw_http(h, b"GET /announce?" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert big.split(b" ", 2)[1] in (b"413", b"431")
            garbage = await raw_http(h, b"\x16\x03\x01\x02\x00hello not http\r\n\r\n")
            assert garbage.startswith(b"HTTP/1.1 400")
            assert (await http_get(h.host, h.port, b"/nope"))[0] == 404
            post = await raw_http(h, b"POST /announce HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert post.startswith(b"HTTP/1.1 405")

            # UDP: truncated, forged, garbage and wrong-connection-id datagrams.
            u = d.addresses["udp"]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(5)
                s.connect((u.host, u.port))
                s.send(b"\x00\x00\x04\x17")  # truncated
                s.send(struct.pack(">QII", 0xDEADBEEF, 0, 1))  # forged protocol id
                s.send(os.urandom(64))  # noise
                s.send(struct.pack(">QII20s20sqqqIIIiH", 12345, 1, 77, IH_A, b"x" * 20, 0, 0, 0, 2, 0, 0, -1, 6881))
                reply = s.recv(2048)  # only the well-formed one is answered: with an error
                assert struct.unpack(">II", reply[:8]) == (3, 77)

            # Still serving, over both protocols.
            assert isinstance(await http(d).announce(ann(1)), AnnounceResponse)
            client = udp(d)
            reply = await client.announce(ann(2))
            client.close()
            assert reply.leechers == 2

            m = await metrics(d)
            http_reasons = rejected(m, "http")
            assert http_reasons.get("not_found") == 1 and http_reasons.get("bad_method") == 1
            assert http_reasons.get("bad_http") == 1 and http_reasons.get("too_large") == 1
            assert sum(http_reasons.values()) == 5
            udp_reasons = rejected(m, "udp")
            assert udp_reasons.get("bad_connection_id") == 1
            # Three datagrams were dropped for their format, each counted once.
            assert sum(udp_reasons.values()) == 4
            assert await d.terminate() == 0


async def test_graceful_restart_keeps_the_swarm(config, tmp_path):
    state = tmp_path / "state"
    with trio.fail_after(60):
        async with await start_tracker(config, state) as d:
            t = http(d)
            for n in range(12):
                await t.announce(ann(n, IH_A, left=0 if n < 4 else 100))
            for n in range(5):
                await t.announce(ann(100 + n, IH_B))
            before = await t.scrape((IH_A, IH_B))
            assert (before[IH_A].complete, before[IH_A].incomplete, before[IH_B].incomplete) == (4, 8, 5)
            assert await d.terminate() == 0
        assert (state / "swarms.msgpack").exists()
        secret = (state / "udp-secret").read_bytes()

        async with await start_tracker(config, state) as d:
            after = await http(d).scrape((IH_A, IH_B))
            assert after == before
            # A restored peer is handed out to newcomers.
            reply = await http(d).announce(ann(999, IH_B))
            assert len(reply.peers) == 5
            assert await d.terminate() == 0
        # BEP 15 connection ids handed out before the restart stay valid.
        assert (state / "udp-secret").read_bytes() == secret


async def udp_exchange(sock: trio.socket.SocketType, request) -> object:
    await sock.send(udp_wire.encode_request(request))
    with trio.fail_after(5):
        return udp_wire.parse_response(await sock.recv(2048))


async def test_udp_connection_id_survives_a_restart(tmp_path):
    """BEP 15: an id handed out before a restart is accepted after it.

    libtorrent caches one id per tracker IP for a minute, process-wide; if a
    restart voided it, every such client would be refused until its cache
    ran out. The restart here is a graceful stop and start on the same state
    directory and address, and the client keeps its socket.
    """
    host = next_host()
    config = write_config(tmp_path / "tracker.toml", host=host, udp_port=free_udp_port(host))
    state = tmp_path / "state"
    with trio.fail_after(60):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            async with await start_tracker(config, state) as d:
                u = d.addresses["udp"]
                await sock.connect((u.host, u.port))
                reply = await udp_exchange(sock, udp_wire.ConnectRequest(7))
                assert isinstance(reply, udp_wire.ConnectResponse)
                cid = reply.connection_id
                assert await d.terminate() == 0
            async with await start_tracker(config, state) as d:
                assert d.addresses["udp"] == u  # the same address (the config names the host)
                reply = await udp_exchange(sock, udp_wire.AnnounceRequest(cid, 8, ann(1)))
                assert isinstance(reply, udp_wire.AnnounceResponse), reply
                assert (reply.transaction_id, reply.leechers) == (8, 1)
                m = await metrics(d)
                assert rejected(m, "udp") == {}
                assert m[("shoal_tracker_announces_total", (("event", "started"), ("protocol", "udp")))] == 1
                assert await d.terminate() == 0


def saved_peers(state) -> set[bytes]:
    """The peer_ids in the tracker's last snapshot (none if there is none yet)."""
    try:
        blob = (state / "swarms.msgpack").read_bytes()
    except FileNotFoundError:
        return set()
    table = SwarmTable(max_torrents=10, max_peers_per_torrent=100, max_peers=100)
    table.restore(blob, now=0.0, timeout=1e9)
    return {pid for swarm in table.swarms.values() for pid in swarm.peers}


async def until_saved(state, peer_id: bytes) -> None:
    """Wait for a periodic snapshot holding ``peer_id`` (the caller bounds the wait)."""
    while peer_id not in saved_peers(state):  # noqa: ASYNC110 - polls a file: a save sends no event
        await trio.sleep(0.1)


async def test_save_interval_is_honoured_below_the_sweep_and_after_a_reload(tmp_path):
    """peer_timeout 3600 makes the expiry sweep 60 s; a 1 s save_interval is
    kept all the same. The tracker starts with 600 s, and a reload to 1 s
    applies at once, not after the 600 s wait in progress."""
    state = tmp_path / "state"
    config = write_config(tmp_path / "tracker.toml", peer_timeout="3600", save_interval="600.0")
    with trio.fail_after(60):
        async with await start_tracker(config, state) as d:
            await http(d).announce(ann(1))
            write_config(config, host=d.addresses["http"].host, peer_timeout="3600", save_interval="1.0")
            await d.reload()
            # 1 s, with room for a loaded machine: far below the 600 s and the 60 s sweep.
            with trio.fail_after(10):
                await until_saved(state, ann(1).peer_id)
            await http(d).announce(ann(2))
            with trio.fail_after(10):  # and again: every second, not once
                await until_saved(state, ann(2).peer_id)
            assert await d.terminate() == 0


async def test_kill_9_during_announce_storm_then_serves_again(config, tmp_path):
    state = tmp_path / "state"
    with trio.fail_after(90):
        async with await start_tracker(config, state) as d:
            answered = 0
            enough = trio.Event()

            async def storm(worker: int) -> None:
                nonlocal answered
                client = udp(d) if worker % 2 else http(d)
                try:
                    for i in range(10_000):
                        n = worker * 10_000 + i
                        await client.announce(ann(n % 3000, IH_A if n % 2 else IH_B))
                        answered += 1
                        if answered >= 3000:
                            enough.set()
                except Exception:
                    # The kill cuts requests off mid-flight; that is the point.
                    pass
                finally:
                    if isinstance(client, UdpTracker):
                        client.close()

            async with trio.open_nursery() as nursery:
                for w in range(8):
                    nursery.start_soon(storm, w)
                await enough.wait()
                assert await d.kill() == -signal.SIGKILL
                nursery.cancel_scope.cancel()

        async with await start_tracker(config, state) as d:
            # Whatever the last periodic snapshot held was readable: nothing was set aside.
            assert not (state / "swarms.corrupt").exists()
            assert "restored" in d.log or not (state / "swarms.msgpack").exists()
            reply = await http(d).announce(ann(5, IH_A))
            assert isinstance(reply, AnnounceResponse)
            u = udp(d)
            assert not isinstance(await u.announce(ann(6, IH_A)), Failure)
            u.close()
            assert await d.terminate() == 0


async def test_sighup_reloads_access_lists_and_refuses_a_bad_one(tmp_path):
    wl = tmp_path / "whitelist"
    wl.write_text(IH_A.hex() + "\n")
    config = write_config(tmp_path / "tracker.toml",
                          access_extra=f'mode = "whitelist"\nwhitelist_file = "{wl}"')
    with trio.fail_after(60):
        async with await start_tracker(config) as d:
            t = http(d)
            assert isinstance(await t.announce(ann(1, IH_A)), AnnounceResponse)
            assert isinstance(await t.announce(ann(2, IH_B)), Failure)

            wl.write_text(IH_A.hex() + "\n" + IH_B.hex() + "\n")
            await d.reload()
            assert isinstance(await t.announce(ann(3, IH_B)), AnnounceResponse)

            wl.write_text("not a hash\n")
            await d.reload()
            m = await metrics(d)
            assert m[("shoal_tracker_config_reloads_total", (("result", "error"),))] == 1
            assert m[("shoal_tracker_config_reloads_total", (("result", "ok"),))] == 1
            assert "line 1: expected a 40-digit hex info-hash" in d.log
            # The previous lists stay in force.
            assert isinstance(await t.announce(ann(4, IH_B)), AnnounceResponse)
            assert isinstance(await t.announce(ann(5, b"\xcc" * 20)), Failure)
            assert await d.terminate() == 0
