"""Failures: any rank killed at any moment, two ranks with Reed-Solomon m = 2,
the coordinator and the backup killed mid-run. Every run must end with the
failure-free result, bit for bit (each app's sequential reference)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.ckpt.apps import load
from tests.checkpoint.cluster import RankRunner, config, start_daemon
from tests.harness import start_daemon as start_process

STEPS = 30


async def _wait_step(rank, step: int, jitter: int) -> None:
    """Until ``rank`` has passed ``step`` safe points, then ``jitter`` more scheduling points:
    the kill lands anywhere, mid-step, mid-message or mid-checkpoint included."""
    while rank.step < step:  # noqa: ASYNC110 - the rank signals no event per step
        await trio.sleep(0.001)  # polling the rank's own step counter
    for _ in range(jitter):
        await trio.lowlevel.checkpoint()


async def _run(app: str, n: int, size: int, victims: list[int], step: int, jitter: int, mode: str,
               shards: int = 1) -> tuple[dict[int, bytes], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            ctx, coordinator, scope = await start_daemon(nursery, config(Path(tmp), "c"))
            runner = RankRunner(nursery, ctx.addresses["rpc"], app, n, size, interval=0.01, block_size=4096,
                                mode=mode, parity_shards=shards)
            for i in range(n):
                runner.start(i)
            with trio.fail_after(30):
                await _wait_step(runner.ranks[victims[0]], step, jitter)
            # A rank that has returned its result is done with the library: a kill
            # then tests nothing (and a late "replacement" would wait for a group
            # that no longer exists).
            group = coordinator.service.groups.get("g")
            if group is not None and group.phase == "finished":
                victims = []
            for v in victims:
                runner.kill(v)
            for v in victims:
                runner.start(v)
            with trio.fail_after(30):
                while not runner.done.is_set():
                    others = all(i in runner.results for i in range(n) if i not in victims)
                    group = coordinator.service.groups.get("g")
                    if others and (group is None or group.phase != "recovering" and group.epoch == 0):
                        # The victim had finished its part before the kill landed: the
                        # app completed, and its "replacement" has no group to join.
                        break
                    await trio.sleep(0.01)  # polling the runner's results
            status = await coordinator.service.rpc_status(None)
            scope.cancel()
    return runner.results, status


def check(results: dict, status: dict, reference: list, victims: list[int]) -> None:
    """Every rank ends with its failure-free result, bit for bit. The one exception: a
    victim killed after it had left the library (no recovery ran, epoch 0) has no result
    to give -- its replacement has no group to join -- and every other rank must still
    match."""
    assert all(results[i] == reference[i] for i in results)
    missing = set(range(len(reference))) - set(results)
    assert missing <= set(victims)
    if missing:
        (group,) = status["groups"]
        assert group["epoch"] == 0 and group["phase"] != "recovering", group


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(victim=st.integers(0, 2), step=st.integers(0, STEPS - 1), jitter=st.integers(0, 30),
       mode=st.sampled_from(["enhanced", "blocking"]))
def test_any_single_rank_killed_at_any_moment_gives_the_failure_free_result(victim, step, jitter, mode):
    results, status = trio.run(_run, "ring", 3, STEPS, [victim], step, jitter, mode)
    check(results, status, load("ring").reference(3, STEPS), [victim])


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=st.sampled_from([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]), step=st.integers(0, STEPS - 1),
       jitter=st.integers(0, 40))
def test_reed_solomon_m2_survives_any_two_ranks_killed_together(pair, step, jitter):
    results, status = trio.run(_run, "ring", 4, STEPS, list(pair), step, jitter, "enhanced", 2)
    check(results, status, load("ring").reference(4, STEPS), list(pair))
    assert status["groups"][0]["m"] == 2


def test_xor_parity_gives_up_on_two_simultaneous_failures():
    async def main():
        with tempfile.TemporaryDirectory() as tmp:
            async with trio.open_nursery() as nursery:
                ctx, coordinator, scope = await start_daemon(nursery, config(Path(tmp), "c"))
                runner = RankRunner(nursery, ctx.addresses["rpc"], "ring", 3, 400, interval=0.01, block_size=4096)
                for i in range(3):
                    runner.start(i)
                with trio.fail_after(30):
                    await _wait_step(runner.ranks[0], 5, 0)
                runner.kill(1)
                runner.kill(2)
                with trio.fail_after(20):
                    while 0 not in runner.errors:  # noqa: ASYNC110 - the runner records, signals nothing
                        await trio.sleep(0.01)  # polling for the survivor's run() to end
                assert "more ranks failed than the parity survives" in str(runner.errors[0])
                assert coordinator.service.groups["g"].phase == "failed"
                assert coordinator.metrics.recoveries.labels("failed")._value.get() == 1
                nursery.cancel_scope.cancel()

    trio.run(main)


# -- the coordinator and the backup, as real processes killed with SIGKILL ----------


def _write_config(path: Path, role: str, listen: str, backup: str = "") -> Path:
    path.write_text(
        "[daemon]\nmetrics_listen = \"\"\n"
        f"[checkpoint]\nrole = \"{role}\"\nlisten = \"{listen}\"\nbackup = \"{backup}\"\n"
        "heartbeat_interval = 0.5\nheartbeat_timeout = 3.0\n"
    )
    return path


async def _daemon(tmp: Path, name: str, role: str, listen: str, backup: str = ""):
    cfg = _write_config(tmp / f"{name}.toml", role, listen, backup)
    return await start_process([sys.executable, "-m", "shoal.cli.main", "checkpoint", "run", "--config", str(cfg)],
                               state_dir=tmp / name)


async def _ranks_until(runner: RankRunner, step: int) -> None:
    """Until every rank has passed ``step``; a rank that ended with an error fails the
    test at once with that error (waiting on its step counter would never end)."""
    with trio.fail_after(60):
        for i, rank in runner.ranks.items():
            while rank.step < step:  # noqa: ASYNC110 - the rank signals no event per step
                assert i not in runner.errors, f"rank {i} failed: {runner.errors[i]!r}"
                await trio.sleep(0.001)  # polling the rank's own step counter


async def _until_logged(daemon, text: str, count: int = 1) -> None:
    with trio.fail_after(20):
        while daemon.log.count(text) < count:  # noqa: ASYNC110 - a file written by another process
            await trio.sleep(0.02)  # polling the daemon's log file


def _gated_ring(hold: int, gate: trio.Event) -> SimpleNamespace:
    """The ring app whose ranks wait at step ``hold`` until ``gate`` is set: a run cannot
    end while the test is still restarting a daemon (on a quiet machine 600 steps took
    less than a coordinator's start-up, and the rank killed next had already finished)."""
    ring = load("ring")

    async def main(rank) -> bytes:
        x, i = rank.state["x"], rank.state["i"]
        right, left = (rank.rank + 1) % rank.n, (rank.rank - 1) % rank.n
        while i[0] < rank.params["steps"]:
            if i[0] == hold:
                await gate.wait()
            await rank.send(right, x)
            y = np.frombuffer(await rank.recv(left), dtype=np.int64)
            x[:] = ring._mix(x, y, int(i[0]))  # noqa: SLF001 - the same step as the shipped app
            i[0] += 1
            await rank.safe_point()
        return x.tobytes()

    return SimpleNamespace(setup=ring.setup, main=main, reference=ring.reference)


@pytest.mark.parametrize("victim", ["coordinator", "backup"])
async def test_killed_coordinator_or_backup_is_recovered(tmp_path: Path, victim: str) -> None:
    """Kill -9 one of them mid-run and restart it on its port. A restarted
    coordinator takes the parity back from the backup (checkpoints are rare here,
    so none is in flight at the kill); a restarted backup is mirrored again.
    Then a rank is killed and must be rebuilt from that parity."""
    steps = 600
    backup = await _daemon(tmp_path, "b1", "backup", "127.0.0.1:0")
    baddr = backup.addresses["rpc"]
    coord = await _daemon(tmp_path, "c1", "coordinator", "127.0.0.1:0", str(baddr))
    caddr = coord.addresses["rpc"]
    interval = 1000.0 if victim == "coordinator" else 0.05
    gate, hold = trio.Event(), steps // 2
    try:
        async with trio.open_nursery() as nursery:
            runner = RankRunner(nursery, caddr, _gated_ring(hold, gate), 3, steps, interval=interval,
                                block_size=4096)
            for i in range(3):
                runner.start(i)
            await _ranks_until(runner, 40)
            if victim == "coordinator":
                assert await coord.kill() == -9
                coord = await _daemon(tmp_path, "c2", "coordinator", str(caddr), str(baddr))
                await _until_logged(coord, "parity rebuilt from the backup")
            else:
                assert await backup.kill() == -9
                backup = await _daemon(tmp_path, "b2", "backup", str(baddr))
                await _until_logged(coord, "in sync", 2)  # at start, and after the copy
                await _ranks_until(runner, min(runner.ranks[0].step + 20, hold))  # mirrored again
            assert not runner.results, "a rank finished before the kill: the test tests nothing"
            gate.set()
            runner.kill(2)
            runner.start(2)
            with trio.fail_after(60):
                await runner.done.wait()
        assert [runner.results[i] for i in range(3)] == load("ring").reference(3, steps)
        assert runner.ranks[2].stats["recovered_bytes"] > 0 or runner.ranks[2].link.number == 0
        assert "recovered in" in coord.log
    finally:
        print("coordinator log:\n", coord.log[-6000:], "\nbackup log:\n", backup.log[-3000:])
        await coord.aclose()
        await backup.aclose()
