"""Start the real tracker daemon (`python -m shoal.cli.main tracker run`) for a test."""

import itertools
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
http_listen = "{host}:0"
udp_listen = "{host}:0"
announce_interval = 2
min_interval = 1
peer_timeout = 8
save_interval = 1.0
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


def write_config(path: Path, tracker_extra: str = "", access_extra: str = "", host: str | None = None) -> Path:
    host = host or next(_hosts)
    path.write_text(LAB.format(host=host, tracker_extra=tracker_extra, access_extra=access_extra))
    return path


def tracker_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "shoal.cli.main", "tracker", "run", "--config", str(config)]


async def start_tracker(config: Path, state_dir: Path | None = None):
    return await start_daemon(tracker_argv(config), state_dir=state_dir)


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path / "tracker.toml")
