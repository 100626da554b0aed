"""The dispatcher's CLI against a real dispatcher: paged `shoal jobs`, `shoal job --summary/--state`,
one size limit, and `shoal config check` of a config file not named after its daemon."""

import json
import subprocess

import pytest
import trio

from shoal.cli.main import main
from shoal.daemons.runtime.rpc import connect_tcp
from shoal.protocol.contract import BadParams
from shoal.protocol.dispatch import JobQuery, JobsQuery, TaskResult
from tests.dispatcher.live import connect, start_dispatcher, wait_job


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # the CLI helper's one-line failures
        return int(exc.code or 0)


def run_cli(capsys, *argv: str) -> subprocess.CompletedProcess:
    """The `shoal` command's own code, in this process (a process per call costs seconds here)."""
    capsys.readouterr()
    code = _main(list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


async def arun_cli(capsys, *argv: str) -> subprocess.CompletedProcess:
    """run_cli from a trio test: the CLI runs trio itself, so in a thread."""
    capsys.readouterr()
    code = await trio.to_thread.run_sync(_main, list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def test_config_check_finds_the_daemon_from_the_files_tables(tmp_path, capsys):
    def shoal(*argv):
        return run_cli(capsys, *argv)

    (tmp_path / "node1.toml").write_text("[dispatcher]\nlease_seconds = 5.0\n")
    (tmp_path / "edge.toml").write_text("[daemon]\nlog_level = \"info\"\n[worker]\nslots = 2\n")
    (tmp_path / "bad.toml").write_text("[dispatcher]\nlease_seconds = -1\n")
    (tmp_path / "vague.toml").write_text("[daemon]\nlog_level = \"info\"\n")
    r = shoal("config", "check", str(tmp_path / "node1.toml"))
    assert r.returncode == 0 and "ok (dispatcher)" in r.stdout, r.stderr
    r = shoal("config", "check", str(tmp_path / "edge.toml"))
    assert r.returncode == 0 and "ok (worker)" in r.stdout, r.stderr
    r = shoal("config", "check", str(tmp_path / "bad.toml"))
    assert r.returncode == 2 and "dispatcher.lease_seconds" in r.stderr
    r = shoal("config", "check", str(tmp_path / "vague.toml"))  # only [daemon]: any daemon's
    assert r.returncode == 2 and "pass --daemon" in r.stderr


def test_query_contracts_bound_pages_and_states():
    assert JobsQuery.decode({"limit": 1000, "before": 5, "state": "failed"}).before == 5
    with pytest.raises(BadParams):
        JobsQuery.decode({"limit": 1001})  # a page; the CLI pages beyond
    with pytest.raises(BadParams):
        JobsQuery.decode({"state": "sideways"})
    with pytest.raises(BadParams):
        JobQuery.decode({"id": 1, "states": ["done", "lost"]})


def spec(name: str, tasks: list[dict]) -> bytes:
    return json.dumps({"name": name, "tasks": tasks}).encode()


async def test_jobs_are_paged_and_a_big_job_has_a_summary(tmp_path, capsys):
    async def shoal(*argv):
        return await arun_cli(capsys, *argv)

    with trio.fail_after(120):
        async with await start_dispatcher(tmp_path, extra="max_tasks_per_job = 5000") as d:
            sock = str(d.submit_socket)
            async with await connect(d) as c:
                for i in range(1005):
                    await c.call("submit", {"spec": spec(f"j{i}", [{"name": "a", "builtin": "sleep 0"}])})
                big = (await c.call("submit", {"spec": spec("big", [
                    {"name": "t", "replicas": 5000, "builtin": "sleep 0"}])}))["job"]
                bad = (await c.call("submit", {"spec": spec("bad", [
                    {"name": "x", "builtin": "sleep 0"}, {"name": "y", "builtin": "sleep 0", "deps": ["x"]}])}))["job"]
                # a worker (played over the real RPC) fails job `bad`'s first task
                async with await connect_tcp(d.addresses["rpc"]) as w:
                    await w.call("register", {"worker": "w", "cpus": 1, "memory": 1e9, "cpu_speed": 1.0,
                                              "bandwidth": 1e8, "rtt": 0.0})
                    while True:
                        units = (await w.call("pull", {"worker": "w", "max": 64, "wait": 1.0}))["units"]
                        mine = [u for u in units if u["key"] == f"{bad}/x"]
                        if mine:
                            break
                    row = TaskResult("x", 3, 1.0, 2.0, stderr=b"no such file\n").to_row()
                    await w.call("report", {"worker": "w", "results": [[f"{bad}/x", [row]]]})
                assert (await wait_job(c, bad))["state"] == "failed"

            r = await shoal("jobs", "--limit", "1003", "--socket", sock)
            assert r.returncode == 0, r.stderr
            ids = [int(line.split()[0]) for line in r.stdout.splitlines()[1:]]
            assert ids == list(range(bad, bad - 1003, -1))  # newest first, two pages, no gap or repeat
            r = await shoal("jobs", "--before", "100", "--limit", "3", "--socket", sock)
            assert [int(line.split()[0]) for line in r.stdout.splitlines()[1:]] == [99, 98, 97]
            r = await shoal("jobs", "--state", "failed", "--limit", "5000", "--socket", sock)
            assert [int(line.split()[0]) for line in r.stdout.splitlines()[1:]] == [bad]

            r = await shoal("job", str(big), "--summary", "--socket", sock)
            assert r.returncode == 0, r.stderr
            assert "pending 5000" in r.stdout and len(r.stdout) < 1000
            r = await shoal("job", str(bad), "--summary", "--socket", sock)
            assert "job failed: task x exit 3" in r.stdout and "first failed tasks (1 of 1)" in r.stdout
            assert "  x " in r.stdout and "  y " not in r.stdout
            r = await shoal("job", str(bad), "--state", "cancelled", "--socket", sock)
            assert "  y " in r.stdout and "  x " not in r.stdout
            r = await shoal("job", str(big), "--state", "pending", "--socket", sock)  # filtered pages: every one
            assert r.returncode == 0 and r.stdout.count("  t.") == 5000

            # one size limit, whichever side sees the spec first: the dispatcher's (max_spec_bytes)
            filler = "#" + "x" * 1000 + "\n"
            for size in (600_000, 1_000_000):
                f = tmp_path / f"huge{size}.toml"
                f.write_text('[[tasks]]\nname = "a"\nbuiltin = "sleep 0"\n' + filler * (size // len(filler)))
                r = await shoal("submit", str(f), "--socket", sock)
                assert r.returncode == 2 and f"spec is {f.stat().st_size} bytes, the limit is 524288" in r.stderr, (
                    size, r.stderr)
            assert await d.terminate() == 0
