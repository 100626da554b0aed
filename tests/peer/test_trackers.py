"""No tracker's behaviour can end the peer daemon (issue 11).

Hostile HTTP "trackers" on loopback reset every connection, close half way
through a response, never answer, answer garbage, or refuse connections.
The announce client turns each of these into one ``TrackerError`` with a
reason; the daemon counts it in ``shoal_peer_tracker_errors_total``, retries
with a capped exponential back-off, keeps serving peers over the peer wire,
and stops cleanly even when its "stopped" announce fails.
"""

import os
import socket

import pytest
import trio

from shoal.daemons.peer.announce import TRACKER_ERROR_REASONS, TrackerError, open_tracker
from shoal.daemons.peer.metadata import fetch_metadata
from shoal.demo.realclients import make_shared_file
from shoal.protocol.metainfo import Magnet, parse_metainfo
from shoal.protocol.tracker import Announce, Event

from .conftest import next_tracker_ip, sha1
from .hostile_trackers import HostileTracker, refused_url

# mode -> the reason the announce client gives
MODES = {
    "reset": "reset",
    "half": "eof",
    "silent": "timeout",
    "garbage": "bad_response",
    "refused": "connection_refused",
}


def errors(session, reason: str) -> float:
    return session.metrics.tracker_errors.labels(reason)._value.get()


async def until(predicate, what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` (state, not time) until it holds, at most ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - metrics have no event to wait on; fail_after bounds this
            await trio.sleep(0.01)  # a poll interval; fail_after bounds the wait


async def tracker_url(nursery, mode: str) -> str:
    if mode == "refused":
        return refused_url()
    tracker = await nursery.start(HostileTracker(mode).run)
    return tracker.url


def quick(session) -> None:
    """Short tracker timeouts and back-off, so a test sees several retries in a second."""
    session.tracker_timeout = 0.3
    session.announce_retry_first = 0.05
    session.announce_retry_max = 0.2


def announce(info_hash: bytes, event: Event = Event.STARTED) -> Announce:
    return Announce(info_hash=info_hash, peer_id=b"-EV0001-" + os.urandom(6).hex().encode(), port=6881,
                    uploaded=0, downloaded=0, left=1, event=event, numwant=50)


@pytest.mark.parametrize("mode", MODES)
async def test_the_announce_client_raises_only_tracker_error(nursery, mode):
    url = await tracker_url(nursery, mode)
    with trio.fail_after(10):
        for call in ("announce", "scrape"):
            tracker = open_tracker(url, timeout=0.3)
            try:
                with pytest.raises(TrackerError) as caught:
                    if call == "announce":
                        await tracker.announce(announce(os.urandom(20)))
                    else:
                        await tracker.scrape((os.urandom(20),))
            finally:
                tracker.close()
            assert caught.value.reason == MODES[mode], (call, caught.value)
            assert caught.value.reason in TRACKER_ERROR_REASONS


@pytest.mark.parametrize("mode", MODES)
async def test_a_seeder_outlives_a_hostile_tracker_and_serves_a_leecher(lab, tmp_path, nursery, mode):
    with trio.fail_after(60):
        url = await tracker_url(nursery, mode)
        shared = make_shared_file(tmp_path / "seed", "data.bin", 2 << 20, url, piece_length=256 * 1024)
        meta = parse_metainfo(shared.torrent.read_bytes())
        seeder = await lab.peer()
        assert all(errors(seeder, r) == 0 for r in TRACKER_ERROR_REASONS)  # every reason exported at 0
        quick(seeder)
        seed = await seeder.add(meta, shared.path.parent)
        assert seed.state == "seeding"
        # The first announce failed, and it is retried (with back-off), never fatal.
        await until(lambda: errors(seeder, MODES[mode]) >= 3, "retried announces")

        leecher = await lab.peer()
        quick(leecher)
        got = await leecher.add(meta)
        got.add_addresses([(seeder.listen_addr.host, seeder.listen_addr.port)])
        await got.completed.wait()
        assert sha1(got.save_dir / "data.bin") == sha1(shared.path)
        await until(lambda: errors(leecher, MODES[mode]) >= 1, "the leecher's failed announce")
        assert meta.info_hash in seeder.torrents and seed.state == "seeding"

        # Stopping announces "stopped" to the same tracker; that fails too, is
        # counted, and the torrent still goes away.
        before = errors(seeder, MODES[mode])
        assert seeder.remove(meta.info_hash)
        await until(lambda: meta.info_hash not in seeder.torrents, "the torrent to stop")
        assert errors(seeder, MODES[mode]) > before
        assert all(errors(seeder, r) == 0 for r in TRACKER_ERROR_REASONS if r != MODES[mode])


async def test_a_tracker_that_starts_resetting_after_working_does_not_stop_the_peer(lab, tmp_path, nursery):
    """The tracker on the same node stopped first: the peer's "stopped" announce is reset."""
    with trio.fail_after(60):
        tracker = await nursery.start(HostileTracker("ok").run)
        shared = make_shared_file(tmp_path / "seed", "data.bin", 1 << 20, tracker.url, piece_length=256 * 1024)
        meta = parse_metainfo(shared.torrent.read_bytes())
        seeder = await lab.peer()
        quick(seeder)
        await seeder.add(meta, shared.path.parent)
        await until(lambda: seeder.metrics.announces.labels("ok")._value.get() >= 1, "a good announce")
        tracker.mode = "reset"
        connections = tracker.connections
        assert seeder.remove(meta.info_hash)
        await until(lambda: meta.info_hash not in seeder.torrents, "the torrent to stop")
        assert tracker.connections > connections  # the stopped announce was attempted
        assert errors(seeder, "reset") == 1  # and failed once, counted once


@pytest.mark.parametrize("mode", ["reset", "half", "silent"])
async def test_fetching_metadata_retries_a_hostile_tracker(lab, nursery, mode):
    with trio.fail_after(30):
        url = await tracker_url(nursery, mode)
        fetcher = await lab.peer()
        quick(fetcher)
        magnet = Magnet(info_hash=os.urandom(20), trackers=(url,))
        async with trio.open_nursery() as inner:
            inner.start_soon(fetch_metadata, fetcher, magnet)
            await until(lambda: errors(fetcher, MODES[mode]) >= 3, "retried announces")
            inner.cancel_scope.cancel()


@pytest.mark.parametrize("mode, reason", [("silent", "timeout"), ("refused", "connection_refused"),
                                          ("garbage", "timeout")])
async def test_the_udp_announce_client_raises_only_tracker_error(mode, reason):
    """BEP 15: silence and garbage are retried, then given up on; an ICMP refusal ends it at once."""
    host = next_tracker_ip()
    with trio.socket.socket(type=socket.SOCK_DGRAM) as sock:
        await sock.bind((host, 0))
        port = sock.getsockname()[1]
        if mode == "refused":
            sock.close()

        async def answer_garbage() -> None:
            while True:
                _data, addr = await sock.recvfrom(2048)
                await sock.sendto(b"\xff" * 7, addr)  # no action, no transaction id of ours

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                if mode == "garbage":
                    inner.start_soon(answer_garbage)
                tracker = open_tracker(f"udp://{host}:{port}/announce", timeout=0.1)
                try:
                    with pytest.raises(TrackerError) as caught:
                        await tracker.announce(announce(os.urandom(20)))
                finally:
                    tracker.close()
                inner.cancel_scope.cancel()
    assert caught.value.reason == reason, caught.value
