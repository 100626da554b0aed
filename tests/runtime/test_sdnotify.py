"""sd_notify datagrams, against a real socket bound by the test."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from shoal.daemons.runtime.sdnotify import Notifier


@pytest.fixture
def receiver(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)  # a missing datagram fails the test instead of hanging
    yield sock, str(path)
    sock.close()


def fields(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())


def test_messages(receiver):
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("listening http=127.0.0.1:80")
    assert fields(sock) == {"READY": "1", "STATUS": "listening http=127.0.0.1:80"}
    n.status("two\nlines")
    assert fields(sock) == {"STATUS": "two lines"}
    n.reloading()
    got = fields(sock)
    assert got["RELOADING"] == "1" and int(got["MONOTONIC_USEC"]) > 0
    n.stopping()
    assert fields(sock) == {"STOPPING": "1"}
    n.watchdog()
    assert fields(sock) == {"WATCHDOG": "1"}
    n.close()


def test_abstract_socket():
    name = f"shoal-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert fields(sock) == {"READY": "1"}
    finally:
        sock.close()


def test_no_socket_is_a_no_op_and_a_vanished_one_does_not_raise(tmp_path):
    n = Notifier({})
    assert not n.enabled and not n.ready() and n.watchdog_interval is None
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")}).ready()


@pytest.mark.parametrize(
    "env,interval",
    [
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, interval):
    assert Notifier(env).watchdog_interval == interval
