"""Free-rider penalty: how much slower a peer that never uploads is served.

    .venv/bin/python bench/p2p/freerider.py [--reciprocators 8] [--pieces 256] [--cap-kib 64] [--runs 3]

The swarm of tests/peer/test_titfortat.py, larger and repeated: R
reciprocating shoal peers, each starting with a random half of the file
(every piece on half of them) and an upload cap of --cap-kib KiB/s, and one
free-rider that starts empty and never unchokes anyone (choker slots 0,
optimistic_slots 0). There is no seeder, so every byte moves by trade and
upload capacity is the scarce resource. Every peer but the free-rider runs
the same choker (3 regular slots, 1 optimistic, 1 s rounds, 2 s optimistic
rotation, 3 s rate window: the seeds' rules on a faster clock so a run takes
seconds, not minutes). All peers are shoal Sessions in this process, each on
its own 127.0.5.x address, told of each other directly (no tracker).

Two figures per run:

* **received share**: the free-rider's bytes received when the first
  reciprocator completes, over the median reciprocator's (before any peer is
  a seed, every byte moved was chosen by tit-for-tat or by an optimistic
  unchoke; the fluid model gives about 0.5 for these settings);
* **time ratio**: the time the free-rider needs to have as many bytes as the
  median reciprocator needed in all (half the file), over the median
  reciprocator's completion time -- the same amount of data, so the same
  work, only the service differs.

Printed as a table and saved as freerider.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from shoal.daemons.peer.config import ChokerSection, LimitsSection, PeerConfig, PeerSection  # noqa: E402
from shoal.daemons.peer.session import Session  # noqa: E402
from shoal.daemons.runtime.config import DaemonSection, ListenAddr  # noqa: E402
from shoal.demo.realclients import make_shared_file  # noqa: E402
from shoal.protocol.metainfo import parse_metainfo  # noqa: E402

PIECE = 16 << 10
CHOKER = ChokerSection(slots=3, interval=1.0, optimistic_interval=2.0, rate_window=3.0)
FREE_RIDER = ChokerSection(slots=0, optimistic_slots=0)


async def one_run(tmp: Path, run: int, n: int, pieces: int, cap: int) -> dict:
    shared = make_shared_file(tmp / f"seed{run}", "data.bin", pieces * PIECE, "http://127.0.0.1:1/announce",
                              piece_length=PIECE, seed=run)
    meta = parse_metainfo(shared.torrent.read_bytes())
    data = shared.path.read_bytes()
    rng = random.Random(run)
    holders = [set(rng.sample(range(n), n // 2)) for _ in range(pieces)]
    ips = (f"127.0.5.{i}" for i in range(1, 250))

    async with trio.open_nursery() as nursery:
        async def peer(directory: Path, choker: ChokerSection, upload: int):
            cfg = PeerConfig(daemon=DaemonSection(metrics_listen=None),
                             peer=replace(PeerSection(), listen=ListenAddr(next(ips), 0)),
                             limits=LimitsSection(upload_rate=upload), choker=choker)
            session = Session(cfg, CollectorRegistry(), directory, directory.parent / (directory.name + ".resume"))
            await nursery.start(session.run)
            return await session.add(meta, directory)

        reciprocators = []
        for i in range(n):
            part = bytearray(len(data))
            for p, who in enumerate(holders):
                if i in who:
                    part[p * PIECE:(p + 1) * PIECE] = data[p * PIECE:(p + 1) * PIECE]
            d = tmp / f"run{run}" / f"r{i}"
            d.mkdir(parents=True)
            (d / "data.bin").write_bytes(part)
            reciprocators.append(await peer(d, CHOKER, cap))
        (tmp / f"run{run}" / "fr").mkdir()
        free_rider = await peer(tmp / f"run{run}" / "fr", FREE_RIDER, 0)
        everyone = [*reciprocators, free_rider]
        start = trio.current_time()
        for t in everyone:
            t.add_addresses((o.session.listen_addr.host, o.session.listen_addr.port) for o in everyone if o is not t)

        done_at: list[float] = []
        share: dict = {}
        need = statistics.median(t.left() for t in reciprocators)

        async def finish(t) -> None:
            await t.completed.wait()
            done_at.append(trio.current_time() - start)
            if len(done_at) == 1:
                share.update(free_rider=free_rider.downloaded,
                             median=statistics.median(r.downloaded for r in reciprocators))

        async with trio.open_nursery() as waiters:
            for t in reciprocators:
                waiters.start_soon(finish, t)
        while free_rider.downloaded < need and not free_rider.completed.is_set():
            await free_rider.piece_verified.wait()
        fr_time = trio.current_time() - start
        nursery.cancel_scope.cancel()
    median_done = statistics.median(done_at)
    return {
        "run": run, "received_share": share["free_rider"] / share["median"],
        "median_reciprocator_done_s": median_done, "free_rider_same_bytes_s": fr_time,
        "time_ratio": fr_time / median_done, "bytes_needed": need,
    }


async def main_async(args) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="shoal-freerider-") as tmp:
        for run in range(args.runs):
            r = await one_run(Path(tmp), run, args.reciprocators, args.pieces, args.cap_kib << 10)
            print(f"run {run}: received share {r['received_share']:.2f}, "
                  f"time ratio {r['time_ratio']:.2f} ({r['free_rider_same_bytes_s']:.1f}s vs "
                  f"{r['median_reciprocator_done_s']:.1f}s)", flush=True)
            results.append(r)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reciprocators", type=int, default=8)
    ap.add_argument("--pieces", type=int, default=256, help="16 KiB pieces in the file")
    ap.add_argument("--cap-kib", type=int, default=64, help="each reciprocator's upload cap, KiB/s")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "freerider.json")
    args = ap.parse_args()
    results = trio.run(main_async, args)
    summary = {
        "settings": {"reciprocators": args.reciprocators, "pieces": args.pieces, "piece_bytes": PIECE,
                     "cap_bytes_per_s": args.cap_kib << 10, "runs": args.runs},
        "runs": results,
        "received_share_median": statistics.median(r["received_share"] for r in results),
        "time_ratio_median": statistics.median(r["time_ratio"] for r in results),
    }
    print(f"\nfree-rider, median of {args.runs} runs: received share {summary['received_share_median']:.2f} "
          f"of a reciprocator's; needs {summary['time_ratio_median']:.2f}x the time for the same bytes")
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
