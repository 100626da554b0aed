"""Memory per peer in the tracker's swarm table (the figure docs/tracker.md quotes).

    .venv/bin/python bench/tracker/memory.py [--peers 100000]

Peers have distinct IPv4 addresses and peer_ids, spread over 100 torrents,
a third of them seeders; tracemalloc counts what the table holds once they
are in.
"""

from __future__ import annotations

import argparse
import tracemalloc

from shoal.daemons.tracker.swarm import SwarmTable
from shoal.protocol.tracker import Announce


def bytes_per_peer(peers: int) -> float:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    table = SwarmTable(max_torrents=1000, max_peers_per_torrent=peers, max_peers=peers)
    for n in range(peers):
        a = Announce(info_hash=(n % 100).to_bytes(20, "big"), peer_id=n.to_bytes(20, "big"),
                     port=1024 + n % 60000, uploaded=0, downloaded=0, left=n % 3)
        table.announce(a, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 0, 0.0)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert table.peer_count == peers
    return held / peers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=100_000)
    args = ap.parse_args()
    print(f"{bytes_per_peer(args.peers):.0f} bytes per peer ({args.peers} peers)")


if __name__ == "__main__":
    main()
