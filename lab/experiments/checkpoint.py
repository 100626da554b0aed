"""The checkpoint experiment (seed 003, Tables 10-12): O, L and R with a whole host failing.

Theory of operation
-------------------
The hosts: the checkpoint coordinator (P_c) and its backup (P_b), two hosts
running the ``checkpoint`` daemon (the lab renders the first as coordinator,
the second as backup), and the *worker hosts*: every other host but the
monitor, in file order. The first ``ranks`` worker hosts run one rank process
each (``python -m shoal.ckpt.launcher rank``, the library's own rank entry
point, started with :meth:`Lab.spawn` inside the host); the others are spares.
A rank listens on its host's lab address, talks to the coordinator and to its
peers over the lab network, and authenticates with the shared checkpoint token
the lab installed on its host.

For each link rate (every worker host's upload and download, changed between
rates with ``lab.net.set_link``) and each mode (``blocking``: Plank's N+1
parity, every rank frozen for a round; ``enhanced``: the seed's Timeout rule
and partial message logging), two runs of the app, each its own group:

1. failure-free: its result is the reference, its duration T the scale of the
   failure's moment, its O and L (the coordinator's means per checkpoint) the
   table's;
2. with a failure: at a moment drawn uniformly from ``[fail_from, fail_to] * T``
   after every rank holds checkpoint 0 (``random.Random(scenario.seed)``), one
   rank host (also drawn) fails whole: ``host-down`` kills every process in it
   and takes its link down. A replacement rank process, same rank id, starts at
   once on a spare host; it joins when the coordinator has seen the rank go
   (a closed connection or the heartbeat timeout), receives the lost image
   decoded from the survivors' checkpoints and the parity, and the survivors
   roll back. R is the coordinator's: failure detected to every rank running
   again. If the group finished before that moment (it ran faster than the
   failure-free run did, as on a loaded machine), the run is made again with
   the moment halved, up to :data:`ATTEMPTS` runs; every run stays on record.

A failed host never comes back in this lab: host-down killed every process in
its namespace (the lab's delay line too, when the links have a delay) and its
switch port stays down. So each failure round consumes a host: the spare that
took over stays a rank host for the rounds that follow, and the scenario needs
one spare per failure round (``len(modes) * len(rates)``).

Correctness (the checks): every failure-free result equals the app's
sequential reference (``reference(n, size)``) bit for bit; in every failure
round the host failed while the group was running (not before checkpoint 0,
not after the end), the group recovered (a new epoch and an R measured), every
rank id ended with exactly one process that exited 0, and each rank's result is
byte-identical to the failure-free run's.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import trio

from shoal.ckpt.apps import APPS, load
from shoal.ckpt.launcher import rank_argv
from shoal.core.checkpoint.parity import MAX_BLOCK_SIZE
from shoal.daemons.runtime.config import ListenAddr, read_token, setting
from shoal.daemons.runtime.rpc import RpcClient, open_client
from shoal.lab.experiment import Result
from shoal.lab.lab import Lab, LabError
from shoal.lab.scenario import Fault

__all__ = ["Params", "run"]

POLL = 0.05  # s between looks at the coordinator's status (a condition polled under a deadline)
#: Runs with a failure per mode and rate: when the group finished before the failure's moment (it ran
#: faster than the failure-free run, as on a loaded machine), the run is made again with the moment halved.
ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Params:
    app: str = setting("apsp", choices=tuple(APPS), help="the checkpointed app (shoal.ckpt.apps)")
    size: int = setting(200, min=1, max=10_000_000, help="the app's problem size (see each app's docstring)")
    ranks: int = setting(4, min=2, max=64, help="rank processes, one per worker host")
    modes: tuple[Literal["blocking", "enhanced"], ...] = setting(("blocking", "enhanced"))
    rates: tuple[float, ...] = setting((2.0, 16.0), min=0.0, max=10_000.0,
                                       help="MiB/s, each worker host's upload and download (0: unshaped)")
    interval: float = setting(0.2, min=0.01, max=3600.0, help="s, the checkpoint timer (the seed's Timeout)")
    block_size: int = setting(65536, min=512, max=MAX_BLOCK_SIZE, help="bytes per parity block")
    fail_from: float = setting(0.2, min=0.0, max=1.0, help="earliest failure moment, as a fraction of T")
    fail_to: float = setting(0.5, min=0.0, max=1.0, help="latest failure moment, as a fraction of T")
    run_timeout: float = setting(300.0, min=1.0, max=86_400.0, help="s for one run of the app")

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError("modes: name at least one of blocking, enhanced")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError("modes: a mode is listed twice")
        if not self.rates:
            raise ValueError("rates: name at least one link rate")
        if self.fail_from > self.fail_to:
            raise ValueError(f"fail_from: {self.fail_from} is after fail_to ({self.fail_to})")


@dataclass
class Run:
    """One run of the app: one group at the coordinator."""

    group: str
    mode: str
    rate: float
    hosts: list[str]  # rank i's host at the start
    seconds: float = float("nan")  # every rank at checkpoint 0 -> every rank process exited
    status: dict[str, Any] = field(default_factory=dict)  # the coordinator's record of the group
    exits: dict[int, list[int | None]] = field(default_factory=dict)  # rank -> exit codes of its processes
    results: list[bytes | None] = field(default_factory=list)
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)  # rank -> its own statistics
    failed_host: str = ""
    replacement: str = ""
    victim: int = -1  # the failed host's rank
    fail_at: float = float("nan")  # s after checkpoint 0
    phase_at_failure: str = ""
    error: str = ""  # why the run did not finish
    attempt: int = 1  # a failure run made again (ATTEMPTS)


class Experiment:
    def __init__(self, lab: Lab, params: Params) -> None:
        self.lab, self.p = lab, params
        self.module = load(params.app)
        self.rng = random.Random(lab.scenario.seed)
        s = lab.scenario
        ckpt = [h.name for h in s.running("checkpoint")]
        coords = [h for h in ckpt if "rpc" in lab.bundle.plan(h, "checkpoint").ports]
        if not coords:
            raise LabError(f"{s.source}: the checkpoint experiment needs a host running the checkpoint daemon")
        self.coord_host = coords[0]
        self.coord = ListenAddr.parse(lab.bundle.plan(self.coord_host, "checkpoint").ports["rpc"])
        workers = [h.name for h in s.hosts if "checkpoint" not in h.daemons and h.name != s.monitor.host]
        rounds = len(params.modes) * len(params.rates)
        if len(workers) < params.ranks + rounds:
            raise LabError(f"{s.source}: experiment.params.ranks: {params.ranks} rank hosts and one spare per "
                           f"failure round ({rounds}) need {params.ranks + rounds} hosts that run no checkpoint "
                           f"daemon; the scenario has {len(workers)}")
        self.ranks = workers[:params.ranks]  # rank i runs on ranks[i]
        self.spares = workers[params.ranks:]
        self.workers = workers
        self.base = lab.workdir / "checkpoint"
        self.base.mkdir()
        self.history: list[Run] = []  # every run, in order (a failure run made again included)

    async def status(self, client: RpcClient, group: str) -> dict[str, Any] | None:
        reply = await client.call("status")
        return next((g for g in reply["groups"] if g["group"] == group), None)

    async def client(self) -> RpcClient:
        """An RPC connection to the coordinator, from its own host, with the group token."""
        token = read_token(self.lab.bundle.token("checkpoint", self.coord_host), "checkpoint.token_file")
        stream = await self.lab.connect(self.coord_host, self.coord.host, self.coord.port)
        return await open_client(stream, token=token)

    async def set_rate(self, rate: float) -> None:
        for h in self.workers:
            if h not in self.lab.down_hosts:
                await trio.to_thread.run_sync(partial(self.lab.net.set_link, h, upload=rate, download=rate))
        self.lab.progress(f"worker hosts' links: {rate:g} MiB/s up and down" if rate else
                          "worker hosts' links: unshaped")

    async def one(self, mode: str, rate: float, *, fail_after: float | None, attempt: int = 1) -> Run:
        p, lab = self.p, self.lab
        kind = "ref" if fail_after is None else "fail" if attempt == 1 else f"fail{attempt}"
        run = Run(f"{p.app}-{mode}-{rate:g}-{kind}", mode, rate, list(self.ranks), attempt=attempt)
        out = self.base / run.group
        out.mkdir()
        procs: dict[int, trio.Process] = {}
        done = trio.Event()

        async def rank(i: int, host: str) -> None:
            argv = rank_argv(p.app, i, p.ranks, self.coord, group=run.group, mode=mode, interval=p.interval,
                             size=p.size, block_size=p.block_size, shards=1, out=out / f"rank{i}",
                             token_file=lab.bundle.token("checkpoint", host),
                             listen=ListenAddr(lab.address(host), 0))
            proc = await lab.spawn(host, argv, name=f"{run.group}.rank{i}")
            procs[i] = proc
            code = await proc.wait()
            run.exits.setdefault(i, []).append(code)
            if all(q.returncode is not None for q in procs.values()) and len(procs) == p.ranks and not (
                    run.failed_host and not run.replacement):
                done.set()

        lab.progress(f"{run.group}: {p.ranks} ranks of {p.app} (size {p.size}) on {', '.join(run.hosts)}")
        try:
            with trio.move_on_after(p.run_timeout) as deadline:
                async with await self.client() as client, trio.open_nursery() as nursery:
                    for i, h in enumerate(run.hosts):
                        nursery.start_soon(rank, i, h)
                    # every rank joined and committed checkpoint 0
                    while (g := await self.status(client, run.group)) is None or g["phase"] == "starting":
                        if done.is_set():
                            break
                        await trio.sleep(POLL)
                    t0 = time.monotonic()
                    if fail_after is not None:
                        await self.fail(run, client, nursery, rank, t0, fail_after, done)
                    await done.wait()
                    run.seconds = time.monotonic() - t0
                    run.status = await self.status(client, run.group) or {}
            if deadline.cancelled_caught:
                with trio.move_on_after(10.0):  # where the group got stuck, for the record
                    async with await self.client() as client:
                        run.status = await self.status(client, run.group) or {}
                run.error = (f"did not finish in {p.run_timeout:g}s (experiment.params.run_timeout); the group "
                             f"is {run.status.get('phase', 'unknown')}, checkpoints {run.status.get('numbers')}")
        finally:
            for proc in procs.values():
                if proc.returncode is None:
                    proc.kill()
        for i in range(p.ranks):
            path = out / f"rank{i}"
            run.results.append(path.read_bytes() if path.exists() else None)
            stats = path.with_suffix(".json")
            if stats.exists():
                run.stats[i] = json.loads(stats.read_text())
        self.history.append(run)
        lab.progress(f"{run.group}: " + (run.error or f"finished in {run.seconds:.2f}s after checkpoint 0, "
                                                      f"epoch {run.status.get('epoch')}"))
        if run.error and lab.out is not None:
            logs = lab.out / f"logs-{run.group}"
            logs.mkdir(exist_ok=True)
            for f in [*(lab.workdir / "logs").glob(f"*.{run.group}.*"), self.lab.daemons[(self.coord_host,
                                                                                       "checkpoint")].log]:
                shutil.copy(f, logs / f.name)
        return run

    async def fail(self, run: Run, client: RpcClient, nursery: trio.Nursery, rank: Any, t0: float,
                   fail_after: float, done: trio.Event) -> None:
        """At ``t0 + fail_after``, take a rank host down and start its rank again on a spare."""
        victim = self.rng.randrange(len(self.ranks))
        with trio.move_on_at(trio.current_time() + max(0.0, t0 + fail_after - time.monotonic())):
            await done.wait()
        g = await self.status(client, run.group)
        run.phase_at_failure = g["phase"] if g else "gone"
        if done.is_set() or run.phase_at_failure != "running":
            self.lab.progress(f"{run.group}: the group was {run.phase_at_failure} at the failure moment "
                              f"({fail_after:.2f}s); nothing to fail")
            return
        host, spare = self.ranks[victim], self.spares.pop(0)
        run.failed_host, run.victim, run.fail_at = host, victim, time.monotonic() - t0
        await self.lab.apply(Fault(at=round(self.lab.now(), 3), kind="host-down", host=host))
        self.ranks[victim] = spare  # the failed host never comes back in this lab
        run.replacement = spare
        self.lab.progress(f"{run.group}: host {host} (rank {victim}) failed {run.fail_at:.2f}s after checkpoint 0; "
                          f"rank {victim} starts again on {spare}")
        nursery.start_soon(rank, victim, spare)


def _ms(x: Any) -> float:
    return round(float(x) * 1e3, 2) if isinstance(x, (int, float)) else float("nan")


def _report(params: Params, reference: list[bytes], runs: list[tuple[Run, Run]], history: list[Run],
            result: Result) -> None:
    for ref, failed in runs:
        what = f"{ref.mode} at {ref.rate:g} MiB/s"
        same_ref = not ref.error and ref.results == reference
        result.check(f"{what}: the failure-free result is the sequential reference", same_ref,
                     ref.error or f"{sum(r == e for r, e in zip(ref.results, reference, strict=True))}/"
                                  f"{len(reference)} ranks bit-identical to {params.app}.reference")
        recovered = bool(failed.failed_host) and failed.status.get("epoch", 0) >= 1 and \
            failed.status.get("samples", [0, 0, 0])[2] >= 1
        result.check(f"{what}: a whole host failed mid-run and the group recovered", recovered and not failed.error,
                     failed.error or (f"{failed.failed_host} (down {failed.fail_at:.2f}s after checkpoint 0, "
                                      f"group {failed.phase_at_failure}) replaced by {failed.replacement}; "
                                      f"epoch {failed.status.get('epoch')}, R {_ms(failed.status.get('R'))} ms"
                                      if failed.failed_host else
                                      f"no failure: the group was {failed.phase_at_failure or 'not running'} "
                                      "at the failure moment"))
        # The killed process's own code is not judged: the lab's host-down may reap it before
        # trio does, and trio then reports 0 for it. It was killed: it never wrote a result.
        once = len(failed.exits) == params.ranks and all(
            codes[-1] == 0 and len(codes) == (2 if i == failed.victim else 1) for i, codes in failed.exits.items())
        result.check(f"{what}: every rank ended with one process that exited 0", once,
                     f"exit codes per rank {dict(sorted(failed.exits.items()))} (rank {failed.victim} failed)")
        identical = failed.results == ref.results and all(r is not None for r in failed.results)
        result.check(f"{what}: the result after the failure is byte-identical to the failure-free run", identical,
                     f"{sum(a == b and a is not None for a, b in zip(failed.results, ref.results, strict=True))}/"
                     f"{params.ranks} ranks identical")
        result.rows.append({
            "mode": ref.mode, "rate MiB/s": ref.rate or "unshaped",
            "O ms": _ms(ref.status.get("O")), "L ms": _ms(ref.status.get("L")), "R ms": _ms(failed.status.get("R")),
            "ckpts": min(ref.status.get("numbers") or [0]),
            "T s": round(ref.seconds, 2), "T fail s": round(failed.seconds, 2),
            "failed": failed.failed_host or "-", "identical": identical,
        })

    result.data["runs"] = [{k: v for k, v in dataclasses.asdict(r).items() if k != "results"} for r in history]


def _plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    rates = list(dict.fromkeys(r["rate MiB/s"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    width = 0.8 / max(1, len(modes))
    for ax, key, title in zip(axes, ("O ms", "L ms", "R ms"),
                              ("O: overhead per checkpoint", "L: latency per checkpoint", "R: recovery"),
                              strict=True):
        for j, mode in enumerate(modes):
            values = [next((r[key] for r in rows if r["mode"] == mode and r["rate MiB/s"] == rate), 0.0)
                      for rate in rates]
            ax.bar([i + j * width for i in range(len(rates))], values, width, label=mode)
        ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(rates))],
                      [f"{r} MiB/s" if isinstance(r, float) else str(r) for r in rates])
        ax.set_title(title)
        ax.set_ylabel("ms")
        ax.legend()
    fig.suptitle("Diskless checkpointing in the lab: blocking (N+1 parity) vs enhanced, one host failed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def run(lab: Lab, params: Params) -> Result:
    exp = Experiment(lab, params)
    reference = await trio.to_thread.run_sync(exp.module.reference, params.ranks, params.size)
    runs: list[tuple[Run, Run]] = []
    for rate in params.rates:
        await exp.set_rate(rate)
        for mode in params.modes:
            ref = await exp.one(mode, rate, fail_after=None)
            moment = exp.rng.uniform(params.fail_from, params.fail_to) * (0.0 if ref.error else ref.seconds)
            for attempt in range(1, ATTEMPTS + 1):
                failed = await exp.one(mode, rate, fail_after=moment, attempt=attempt)
                if failed.failed_host or failed.error:
                    break
                moment /= 2  # the group ran faster than the failure-free run did (a loaded machine)
            runs.append((ref, failed))
    result = Result()
    _report(params, reference, runs, exp.history, result)
    if lab.out is not None and result.rows:
        result.plots.append(_plot(lab.out / "checkpoint.png", result.rows))
    result.series = {
        "overhead_seconds": "shoal_checkpoint_overhead_seconds_sum / shoal_checkpoint_overhead_seconds_count",
        "latency_seconds": "shoal_checkpoint_latency_seconds_sum / shoal_checkpoint_latency_seconds_count",
        "recoveries": "shoal_checkpoint_recoveries_total",
    }
    return result
