"""Hostile HTTP clients against the real tracker daemon, beside a client that must still be served.

A connection that sends nothing (slowloris), junk without a blank line, or a
request a byte at a time is closed within the header deadline and counted;
one address that opens many connections gets its share and no more, so the
global connection cap is left to the others. Client addresses are 127.0.5.x
(each test its own), so the tracker sees them as distinct hosts.
"""

import itertools

import trio

from shoal.daemons.peer.announce import HttpTracker, TrackerError, TrackerUrl
from shoal.protocol.tracker import AnnounceResponse

from .conftest import start_tracker, write_config
from .test_daemon import ann, metrics, rejected

_clients = (f"127.0.5.{n}" for n in itertools.count(1))


def http_from(d, local_address: str) -> HttpTracker:
    a = d.addresses["http"]
    return HttpTracker(TrackerUrl("http", a.host, a.port, "/announce"), timeout=5, local_address=local_address)


async def connect(d, local_address: str) -> trio.SocketStream:
    a = d.addresses["http"]
    return await trio.open_tcp_stream(a.host, a.port, local_address=local_address)


async def until_closed(stream: trio.SocketStream) -> bytes:
    """Read until the tracker closes the connection (EOF or reset); what it sent."""
    out = b""
    try:
        while chunk := await stream.receive_some(65536):
            out += chunk
    except trio.BrokenResourceError:
        pass
    return out


async def test_silent_and_junk_connections_are_closed_at_the_header_deadline(tmp_path):
    """The default deadline (5 s) holds: before it, such clients were held 30 s.

    Four hostile connections (silent, junk under 4 KiB with no line end, a
    request head that stops before its blank line, a valid request trickled
    a byte at a time) are open while a well-behaved
    client announces; each is closed without an answer within the bound,
    and each is counted as rejected{reason="timeout"}.
    """
    config = write_config(tmp_path / "tracker.toml")
    bad, good = next(_clients), next(_clients)
    with trio.fail_after(60):
        async with await start_tracker(config) as d:
            silent = await connect(d, bad)
            junk = await connect(d, bad)
            await junk.send_all(b"not http at all, " * 200)  # 3.4 KiB, no line end at all
            partial = await connect(d, bad)
            await partial.send_all(b"GET /announce HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 2000)
            trickle = await connect(d, bad)
            closed: dict[str, bytes] = {}

            async def watch(name: str, stream: trio.SocketStream) -> None:
                async with stream:
                    closed[name] = await until_closed(stream)

            async def trickler() -> None:
                request = b"GET /announce?info_hash=" + b"%aa" * 20 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
                try:
                    for byte in request:
                        await trickle.send_all(bytes([byte]))
                        await trio.sleep(0.25)  # the hostile client's pace (it needs ~20 s in all)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            # 15 s: the deadline (5 s) and this loaded machine's slack, half
            # the 30 s such connections used to be held.
            with trio.fail_after(15):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch, "silent", silent)
                    nursery.start_soon(watch, "junk", junk)
                    nursery.start_soon(watch, "partial", partial)
                    nursery.start_soon(watch, "trickle", trickle)
                    nursery.start_soon(trickler)
                    # Served while the three are held open.
                    reply = await http_from(d, good).announce(ann(1))
                    assert isinstance(reply, AnnounceResponse)
            assert closed == {"silent": b"", "junk": b"", "partial": b"", "trickle": b""}
            m = await metrics(d)
            assert rejected(m, "http") == {"timeout": 4}
            # And the tracker still serves.
            assert isinstance(await http_from(d, good).announce(ann(2)), AnnounceResponse)
            assert await d.terminate() == 0


async def test_one_address_cannot_take_every_http_connection(tmp_path):
    """12 connections in all, 4 per address: a crowd of 20 idle connections
    from one address holds 4, the other 16 are closed unread, and another
    address is served; the crowd's address is refused a 5th even for a
    real request. A reload changes the cap for new connections."""
    config = write_config(tmp_path / "tracker.toml", header_timeout="30.0",
                          max_http_connections="12", max_http_connections_per_ip="4")
    crowd_ip, other_ip = next(_clients), next(_clients)
    with trio.fail_after(60):
        async with await start_tracker(config) as d:
            crowd = [await connect(d, crowd_ip) for _ in range(20)]
            refused = 0
            all_refused = trio.Event()

            async def watch(stream: trio.SocketStream) -> None:
                nonlocal refused
                await until_closed(stream)
                refused += 1
                if refused == 16:
                    all_refused.set()

            async with trio.open_nursery() as nursery:
                for stream in crowd:
                    nursery.start_soon(watch, stream)
                await all_refused.wait()
                # Four of the crowd's connections are still held open, idle.
                reply = await http_from(d, other_ip).announce(ann(1))
                assert isinstance(reply, AnnounceResponse)
                try:
                    await http_from(d, crowd_ip).announce(ann(2))
                except TrackerError:
                    pass
                else:
                    raise AssertionError("a 5th connection from the crowd's address was served")
                assert refused == 16
                m = await metrics(d)
                assert rejected(m, "http") == {"ip_connection_limit": 17}
                nursery.cancel_scope.cancel()
            for stream in crowd:
                await stream.aclose()

            # A reload lowers the cap to 1, for new connections at once.
            write_config(config, host=d.addresses["http"].host, header_timeout="30.0",
                         max_http_connections="12", max_http_connections_per_ip="1")
            await d.reload()
            third = next(_clients)
            pair = [await connect(d, third), await connect(d, third)]
            one_closed = trio.Event()

            async def watch_pair(stream: trio.SocketStream) -> None:
                await until_closed(stream)
                one_closed.set()

            async with trio.open_nursery() as nursery:
                for stream in pair:
                    nursery.start_soon(watch_pair, stream)
                await one_closed.wait()  # whichever came second; the other is held, idle
                try:
                    await http_from(d, third).announce(ann(3))
                except TrackerError:
                    pass
                else:
                    raise AssertionError("a 2nd connection was served after the cap became 1")
                assert isinstance(await http_from(d, other_ip).announce(ann(4)), AnnounceResponse)
                assert rejected(await metrics(d), "http") == {"ip_connection_limit": 19}
                nursery.cancel_scope.cancel()
            for stream in pair:
                await stream.aclose()
            assert await d.terminate() == 0
