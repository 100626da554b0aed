"""`shoal ckpt run`: the user's own program (docs/checkpoint.md's worked example,
examples/ckpt/heat.py) run as written, failure-free and with a rank kill -9'd
mid-run and restarted under its id; bit-identical results; bounded restarts and
one-line reasons when the run cannot succeed."""

from __future__ import annotations

import logging
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trio

from shoal.ckpt import NotLaunched, rank_from_env
from shoal.daemons.runtime.config import ListenAddr, read_token
from shoal.daemons.runtime.rpc import RpcError, connect_tcp

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "checkpoint.md"
EXAMPLE = ROOT / "examples" / "ckpt" / "heat.py"
SHOAL = [sys.executable, "-m", "shoal.cli.main"]


def doc_section() -> str:
    text = DOC.read_text()
    start = text.index("## Running your own program")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def documented_command(out: Path) -> list[str]:
    """The section's `shoal ckpt run` line, with this venv's python and shoal and ``out`` for /tmp/heat."""
    lines = [ln.strip() for ln in doc_section().splitlines()
             if ln.strip().startswith("shoal ckpt run --ranks 4") and ln.strip().endswith(" /tmp/heat")]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    assert argv[-1] == "/tmp/heat" and "python" in argv
    argv = [sys.executable if a == "python" else a for a in argv[2:-1]] + [str(out)]
    return [*SHOAL, "ckpt", *argv]


def test_the_documented_program_is_the_shipped_example() -> None:
    blocks = re.findall(r"```python\n(.*?)```", doc_section(), flags=re.S)
    assert EXAMPLE.read_text() in blocks


def reference(ranks: int = 4, cells: int = 10_000, steps: int = 600) -> list[bytes]:
    """The rod computed in one piece, sequentially, with the example's own stencil (cold ends: 0)."""
    heat = runpy.run_path(str(EXAMPLE))
    total = ranks * cells
    u = heat["initial"](0, total, total)
    for _ in range(steps):
        u = heat["stencil"](u, 0.0, 0.0)
    return [u[r * cells:(r + 1) * cells].tobytes() for r in range(ranks)]


class Launcher:
    """`shoal ckpt run` as a subprocess; its output read line by line as it comes."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc, self.text, self.changed = proc, "", trio.Event()

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for chunk in self.proc.stdout:
            self.text += chunk.decode()
            self.changed.set()
            self.changed = trio.Event()

    async def line(self, pattern: str) -> re.Match:
        while (m := re.search(pattern, self.text, flags=re.M)) is None:
            assert self.proc.poll() is None, self.text
            await self.changed.wait()
        return m


async def run_and_kill(argv: list[str], victims: list[int]) -> tuple[int, str]:
    """Run the launcher; once every rank holds a checkpoint past 0 and the group still runs, kill -9 the
    victims' processes at once. Its exit status and output."""
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
    launcher = Launcher(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(launcher.read)
            with trio.fail_after(90):
                head = await launcher.line(r"^coordinator rpc=(\S+) .*token (\S+)$")
                coord, token = ListenAddr.parse(head[1]), read_token(head[2], "token")
                group = (await launcher.line(r"^group (\S+): \d+ ranks"))[1]
                pids = [int((await launcher.line(rf"rank {v}: pid (\d+)$"))[1]) for v in victims]
                # Nothing is accepted without the token, on loopback too.
                with pytest.raises(RpcError, match="unauthorized"):
                    async with await connect_tcp(coord) as anonymous:
                        await anonymous.call("status")
                async with await connect_tcp(coord, token=token) as client:
                    while True:  # mid-run: every rank holds a checkpoint past 0, the group still running
                        groups = {g["group"]: g for g in (await client.call("status"))["groups"]}
                        g = groups.get(group)
                        if g is not None and g["phase"] == "running" and min(g["numbers"]) >= 1:
                            break
                        await trio.sleep(0.05)  # polling the coordinator's status
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, launcher.text


async def test_example_killed_rank_restarts_and_result_is_bit_identical(tmp_path: Path) -> None:
    clean, failed = tmp_path / "clean", tmp_path / "failed"
    with trio.fail_after(60):
        r = await trio.run_process(documented_command(clean), capture_stdout=True, capture_stderr=True,
                                   check=False)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert b"all 4 ranks finished" in r.stdout and b"restarts: none" in r.stdout
    expected = reference()
    assert [(clean / f"rank{i}.bin").read_bytes() for i in range(4)] == expected

    code, out = await run_and_kill(documented_command(failed), [1])
    assert code == 0, out
    assert "rank 1 was killed by SIGKILL; restarting it with the same id (1 of 3 restarts)" in out
    assert "restarts: rank 1 x1" in out
    epoch = int(re.search(r"epoch=(\d+)", out)[1])
    recovery_ms = float(re.search(r"R=([\d.]+) ms", out)[1])
    assert epoch >= 1 and recovery_ms > 0, out  # the coordinator saw the loss and recovered the group
    assert [(failed / f"rank{i}.bin").read_bytes() for i in range(4)] == expected


async def test_two_ranks_lost_at_once_under_xor_fail_the_run_with_the_reason(tmp_path: Path) -> None:
    argv = [*SHOAL, "ckpt", "run", "--ranks", "3", "--interval", "0.2", "--", sys.executable, str(EXAMPLE),
            str(tmp_path), "1000", "100000"]
    code, out = await run_and_kill(argv, [0, 1])
    assert code == 1, out
    assert "shoal: the group failed at the coordinator" in out and "more ranks failed than the parity" in out, out
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".bin")]  # no rank produced a result


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_sigterm_to_the_launcher_stops_every_rank(tmp_path: Path) -> None:
    argv = [*SHOAL, "ckpt", "run", "--ranks", "2", "--", sys.executable, str(EXAMPLE), str(tmp_path), "100", "100000"]
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
    launcher = Launcher(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(launcher.read)
            with trio.fail_after(60):
                pids = [int((await launcher.line(rf"rank {i}: pid (\d+)$"))[1]) for i in range(2)]
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1, launcher.text
    assert "shoal: stopped by SIGTERM" in launcher.text
    assert all(gone(pid) for pid in pids), launcher.text


def test_timeout_stops_every_rank_and_says_so() -> None:
    r = run_cli("--ranks", "2", "--timeout", "1", "--", sys.executable, "-c", "import time; time.sleep(120)")
    assert r.returncode == 1 and "shoal: timed out after 1.0s (--timeout)" in r.stderr, r.stdout + r.stderr
    pids = [int(m) for m in re.findall(r"rank \d: pid (\d+)$", r.stdout, flags=re.M)]
    assert len(pids) == 2 and all(gone(pid) for pid in pids)


async def test_a_given_coordinator_and_backup_are_used_with_their_token(tmp_path: Path, nursery) -> None:
    from shoal.ckpt.launcher import serve_role

    token = tmp_path / "token"
    token.write_text("t" * 40)
    bctx, _ = await serve_role(nursery, "backup", tmp_path, token_file=token)
    cctx, _ = await serve_role(nursery, "coordinator", tmp_path, backup=bctx.addresses["rpc"], token_file=token)
    coord, backup = str(cctx.addresses["rpc"]), str(bctx.addresses["rpc"])
    program = ["--", sys.executable, str(EXAMPLE), str(tmp_path / "out"), "50", "30"]
    with trio.fail_after(60):
        r = await trio.run_process([*SHOAL, "ckpt", "run", "--ranks", "2", "--coordinator", coord, "--backup", backup,
                                    "--token-file", str(token), "--group", "mine", "--interval", "0.1", *program],
                                   capture_stdout=True, capture_stderr=True, check=False)
    out = (r.stdout + r.stderr).decode()
    assert r.returncode == 0 and "group mine: n=2" in out, out
    assert "coordinator rpc=" not in out  # it started none of its own
    assert [(tmp_path / "out" / f"rank{i}.bin").read_bytes() for i in range(2)] == reference(2, 50, 30)
    with trio.fail_after(30):
        r = await trio.run_process([*SHOAL, "ckpt", "run", "--ranks", "2", "--coordinator", coord, "--backup",
                                    "127.0.0.1:9", "--token-file", str(token), *program],
                                   capture_stdout=True, capture_stderr=True, check=False)
    assert r.returncode == 1 and f"mirrors to {backup}, not to --backup 127.0.0.1:9" in r.stderr.decode()
    wrong = tmp_path / "wrong"
    wrong.write_text("w" * 40)
    with trio.fail_after(30):
        r = await trio.run_process([*SHOAL, "ckpt", "run", "--ranks", "2", "--coordinator", coord,
                                    "--token-file", str(wrong), *program],
                                   capture_stdout=True, capture_stderr=True, check=False)
    assert r.returncode == 1 and "unauthorized" in r.stderr.decode(), r.stderr


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*SHOAL, "ckpt", "run", *args], capture_output=True, text=True, timeout=timeout)


def test_a_rank_that_keeps_failing_uses_up_the_bounded_restarts() -> None:
    r = run_cli("--ranks", "2", "--max-restarts", "2", "--", sys.executable, "-c", "import sys; sys.exit(3)")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "exited with status 3; all 2 restarts used, giving up" in r.stderr
    assert r.stdout.count("(restart ") == 2, r.stdout


def test_a_program_that_exits_0_without_running_its_rank_is_a_failure() -> None:
    r = run_cli("--ranks", "2", "--", sys.executable, "-c", "pass")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the coordinator never saw group" in r.stderr and r.stderr.strip().count("\n") == 0


CRASH_AFTER_FINISH = """
import sys, numpy as np, trio
from shoal.ckpt import rank_from_env
rank = rank_from_env()
rank.register("x", np.zeros(8))
async def main(rank):
    await rank.safe_point()
    return b""
trio.run(rank.run, main)
sys.exit(5 if rank.rank == 1 else 0)
"""


def test_a_rank_failing_after_the_group_finished_is_not_restarted() -> None:
    r = run_cli("--ranks", "2", "--interval", "0.1", "--", sys.executable, "-c", CRASH_AFTER_FINISH)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rank 1 exited with status 5 after the group finished: not restarted" in r.stderr, r.stderr
    assert "(restart " not in r.stdout


def test_a_program_not_started_by_the_launcher_is_told_so() -> None:
    with pytest.raises(NotLaunched, match="SHOAL_CKPT_TOKEN_FILE is not set"):
        rank_from_env({})


def test_the_environment_names_the_rank(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("x" * 32)
    env = {"SHOAL_CKPT_COORDINATOR": "127.0.0.1:7745", "SHOAL_CKPT_TOKEN_FILE": str(token),
           "SHOAL_CKPT_GROUP": "g1", "SHOAL_CKPT_RANK": "2", "SHOAL_CKPT_RANKS": "3", "SHOAL_CKPT_MODE": "blocking",
           "SHOAL_CKPT_INTERVAL": "0.5", "SHOAL_CKPT_SHARDS": "1", "SHOAL_CKPT_LISTEN": "127.0.0.2:0"}
    rank = rank_from_env(env)
    assert (rank.group, rank.rank, rank.n, rank.mode, rank.interval) == ("g1", 2, 3, "blocking", 0.5)
    assert rank.token == b"x" * 32 and rank.listen == ListenAddr("127.0.0.2", 0)
    with pytest.raises(NotLaunched, match="SHOAL_CKPT_RANK='two'"):
        rank_from_env({**env, "SHOAL_CKPT_RANK": "two"})


FAKE_SSH = """
import subprocess, sys
host, words = sys.argv[1], sys.argv[2:]
with open(sys.argv[0] + ".log", "a") as log:
    log.write(host + " " + next(w for w in words if w.startswith("SHOAL_CKPT_LISTEN=")) + "\\n")
# like ssh: the words joined by spaces, run by the (here: local) shell
sys.exit(subprocess.call(["sh", "-c", " ".join(words)]))
"""


def test_ranks_placed_on_hosts_are_started_through_spawn_and_compute_the_same(tmp_path: Path) -> None:
    ssh = tmp_path / "fake-ssh.py"
    ssh.write_text(FAKE_SSH)
    out = tmp_path / "out dir"  # a space: the remote shell must get the arguments quoted
    r = run_cli("--ranks", "3", "--hosts", "127.0.0.1,127.0.0.2", "--spawn", f"{sys.executable} {ssh} {{host}}",
                "--interval", "0.1", "--", sys.executable, str(EXAMPLE), str(out), "50", "40")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(Path(f"{ssh}.log").read_text().splitlines()) == [  # rank i on host i mod 2, listening there
        "127.0.0.1 SHOAL_CKPT_LISTEN=127.0.0.1:0", "127.0.0.1 SHOAL_CKPT_LISTEN=127.0.0.1:0",
        "127.0.0.2 SHOAL_CKPT_LISTEN=127.0.0.2:0"]
    assert [(out / f"rank{i}.bin").read_bytes() for i in range(3)] == reference(3, 50, 40)


@pytest.mark.parametrize("args, expected", [
    (["--coordinator", "127.0.0.1:7745"], "--coordinator needs --token-file"),
    (["--hosts", "10.1.2.3"], "need --token-file"),
    (["--hosts", "nothost"], "is not an IP address"),
    (["--shards", "4"], "--shards must be"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(args, expected) -> None:
    r = run_cli("--ranks", "4", *args, "--", sys.executable, "-c", "pass")
    assert r.returncode == 2 and expected in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_a_program_that_cannot_be_started_fails_in_one_line(tmp_path: Path) -> None:
    r = run_cli("--ranks", "2", "--", str(tmp_path / "no-such-program"))
    assert r.returncode == 1 and "No such file or directory" in r.stderr and "cannot start rank" in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def test_no_program_is_refused() -> None:
    r = run_cli("--ranks", "2")
    assert r.returncode == 2 and "name the program after --" in r.stderr


def test_heat_reference_is_not_trivial() -> None:
    u = np.frombuffer(b"".join(reference(2, 20, 5)))
    assert u.max() > 0 and len(set(u.tolist())) > 3


@pytest.fixture
def own_logging():
    """run_app routes logging to stderr at warning (for its command line); give the root logger back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)


async def test_the_demo_launcher_requires_its_token_too(own_logging) -> None:
    from shoal.ckpt.launcher import run_app

    class Out:
        """A stream for run_app's report that tells when the coordinator's address is out."""

        def __init__(self) -> None:
            self.text, self.started = "", trio.Event()

        def write(self, s: str) -> None:
            self.text += s
            if "coordinator rpc=" in self.text:
                self.started.set()

        def flush(self) -> None:
            pass

    out = Out()
    refused = []

    async def probe() -> None:
        await out.started.wait()
        coord = ListenAddr.parse(re.search(r"coordinator rpc=(\S+)", out.text)[1])
        with pytest.raises(RpcError, match="unauthorized"):
            async with await connect_tcp(coord) as anonymous:
                await anonymous.call("status")
        refused.append(coord)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
            outcome = await run_app("ring", 2, size=30, interval=0.05, out=out, timeout=50)
    assert outcome.ok, out.text
    assert refused
