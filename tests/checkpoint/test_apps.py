"""The seed's applications on the library: failure-free runs in both modes equal
the sequential references bit for bit; one real multi-process run with a rank
killed by SIGKILL through `shoal ckpt demo`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from shoal.ckpt.apps import APPS, load
from tests.checkpoint.cluster import RankRunner, config, start_daemon

CASES = [("mergesort", 4, 5000), ("cannon", 4, 24), ("apsp", 3, 6), ("ring", 2, 10), ("bigstate", 2, 1)]


@pytest.mark.parametrize("mode", ["enhanced", "blocking"])
@pytest.mark.parametrize("app, n, size", CASES)
async def test_app_matches_its_sequential_reference(tmp_path: Path, nursery, app, n, size, mode) -> None:
    ctx, coordinator, scope = await start_daemon(nursery, config(tmp_path, "c"))
    async with trio.open_nursery() as inner:
        runner = RankRunner(inner, ctx.addresses["rpc"], app, n, size, interval=0.005, block_size=4096, mode=mode)
        for i in range(n):
            runner.start(i)
        with trio.fail_after(30):
            await runner.done.wait()
    assert [runner.results[i] for i in range(n)] == load(app).reference(n, size)
    assert all(r.stats["checkpoints"] >= 1 for r in runner.ranks.values())
    scope.cancel()


def test_every_app_is_listed() -> None:
    assert {c[0] for c in CASES} == set(APPS)


def test_demo_kills_a_rank_process_and_recovers_bit_for_bit() -> None:
    r = subprocess.run([sys.executable, "-m", "shoal.cli.main", "ckpt", "demo", "apsp", "--ranks", "3",
                        "--size", "120", "--kill", "1@0.3", "--interval", "0.1", "--timeout", "60"],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SIGKILL rank 1" in r.stdout or "finished before the kill" in r.stdout
    assert "bit-identical to the failure-free reference (3/3 ranks)" in r.stdout


def test_demo_refuses_bad_arguments_with_one_line() -> None:
    for args, expected in ((["cannon", "--ranks", "3"], "square number"), (["ring", "--kill", "7@1"], "outside")):
        r = subprocess.run([sys.executable, "-m", "shoal.cli.main", "ckpt", "demo", *args], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr
