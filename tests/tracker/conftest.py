"""Start the real tracker daemon (`python -m shoal.cli.main tracker run`) for a test."""

import itertools
import socket
import sys
from pathlib import Path

import pytest

from tests.harness import start_daemon

LAB = """
[daemon]
log_level = "debug"
metrics_listen = "127.0.0.1:0"
stop_timeout = 5.0

[tracker]
http_listen = "{host}:{http_port}"
udp_listen = "{host}:{udp_port}"
{tracker_keys}
{tracker_extra}

[access]
rate_limit = 0.0
{access_extra}
"""


# Each test's tracker gets its own loopback address, as trackers on separate
# hosts would: libtorrent caches BEP 15 connection ids per tracker IP for the
# whole process, so a second tracker on the same IP would be sent the first
# one's ids for a minute.
_hosts = (f"127.0.1.{n}" for n in itertools.count(1))

# [tracker] keys every test tracker gets unless the test says otherwise.
TRACKER_KEYS = {
    "announce_interval": "2",
    "min_interval": "1",
    "peer_timeout": "8",
    "save_interval": "1.0",
}


def write_config(path: Path, tracker_extra: str = "", access_extra: str = "", host: str | None = None,
                 *, http_port: int = 0, udp_port: int = 0, **tracker: str) -> Path:
    """A test config; ``tracker`` keys (TOML values as text) replace TRACKER_KEYS."""
    host = host or next(_hosts)
    keys = "\n".join(f"{k} = {v}" for k, v in {**TRACKER_KEYS, **tracker}.items())
    path.write_text(LAB.format(host=host, http_port=http_port, udp_port=udp_port, tracker_keys=keys,
                               tracker_extra=tracker_extra, access_extra=access_extra))
    return path


def free_udp_port(host: str) -> int:
    """A UDP port free on ``host`` now; each test has its own host, so it stays free."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def next_host() -> str:
    return next(_hosts)


def tracker_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "shoal.cli.main", "tracker", "run", "--config", str(config)]


async def start_tracker(config: Path, state_dir: Path | None = None):
    return await start_daemon(tracker_argv(config), state_dir=state_dir)


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path / "tracker.toml")
