"""HTTP "trackers" on loopback that fail in the ways real networks do.

Each accepts connections on its own 127.0.3.x address and, per ``mode``:

* ``reset``: reads the request, then resets the connection (SO_LINGER {1, 0}
  and close sends a RST instead of a FIN);
* ``half``: sends the status line, headers and half the announced body, then
  closes (EOF mid-response);
* ``silent``: reads the request and never answers;
* ``garbage``: answers bytes that are not HTTP;
* ``ok``: a valid announce response with no peers (to switch a tracker from
  working to failing, set ``mode``).

``refused_url()`` names a port on which nothing listens.
"""

from __future__ import annotations

import socket
import struct

import trio

from shoal.protocol.tracker import AnnounceResponse, encode_announce_response

from .conftest import next_tracker_ip

MAX_REQUEST = 64 * 1024  # a tracker request is a GET line and a few headers


class HostileTracker:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.host = next_tracker_ip()
        self.port = 0
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/announce"

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        mode = self.mode
        try:
            await _read_request(stream)
            if mode == "reset":
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif mode == "half":
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\nd8:completei0e10:inc")
            elif mode == "silent":
                await trio.sleep_forever()
            elif mode == "garbage":
                await stream.send_all(b"\x00\xff\xfenot a tracker\r\n\r\n" * 4)
            elif mode == "ok":
                body = encode_announce_response(AnnounceResponse(1800, 60, 0, 0, ()))
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                      % (len(body), body))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()


async def _read_request(stream: trio.SocketStream) -> None:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < MAX_REQUEST:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        data += chunk


def refused_url() -> str:
    """An http URL whose port had a listener a moment ago and has none now: connecting is refused."""
    host = next_tracker_ip()
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"http://{host}:{port}/announce"
