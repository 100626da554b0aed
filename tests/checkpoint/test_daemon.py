"""The checkpoint daemon as systemd runs it: a real process, its config, its
metrics, `shoal ckpt status`, SIGTERM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from shoal.daemons.runtime.rpc import RpcError, connect_tcp
from tests.harness import scrape, start_daemon

SHOAL = [sys.executable, "-m", "shoal.cli.main"]


def write(tmp: Path, text: str) -> Path:
    path = tmp / "checkpoint.toml"
    path.write_text(text)
    return path


async def test_coordinator_serves_rpc_metrics_and_status_and_stops_cleanly(tmp_path: Path) -> None:
    cfg = write(tmp_path, '[daemon]\nmetrics_listen = "127.0.0.1:0"\n[checkpoint]\nlisten = "127.0.0.1:0"\n')
    async with await start_daemon([*SHOAL, "checkpoint", "run", "--config", str(cfg)]) as d:
        rpc = d.addresses["rpc"]
        async with await connect_tcp(rpc) as c:
            status = await c.call("status")
        assert status["groups"] == [] and status["backup_in_sync"] is False
        text = await scrape(d.addresses["metrics"])
        for name in ("shoal_checkpoint_groups", "shoal_checkpoint_refused_total", "shoal_checkpoint_overhead_seconds",
                     "shoal_checkpoint_optimal_interval_seconds", "shoal_checkpoint_build_info"):
            assert name in text, name
        proc = await trio.run_process([*SHOAL, "ckpt", "status", "--coordinator", str(rpc)], capture_stdout=True,
                                      capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert b"no groups" in proc.stdout and b"MTBF 86400 s" in proc.stdout
        assert await d.terminate() == 0


async def test_tokens_are_required_off_loopback_and_checked(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    cfg = write(tmp_path, f'[daemon]\nmetrics_listen = ""\n[checkpoint]\nlisten = "127.0.0.1:0"\n'
                          f'token_file = "{token}"\n')
    async with await start_daemon([*SHOAL, "checkpoint", "run", "--config", str(cfg)]) as d:
        rpc = d.addresses["rpc"]
        try:
            await connect_tcp(rpc, token=b"wrong-token-wrong-token")
            raise AssertionError("a wrong token was accepted")
        except RpcError as exc:
            assert exc.code == "unauthorized"
        async with await connect_tcp(rpc, token=b"0123456789abcdef0123") as c:
            assert (await c.call("status"))["groups"] == []
        assert await d.terminate() == 0


def test_config_check_refuses_bad_configs_with_one_line(tmp_path: Path) -> None:
    cases = [
        ('[checkpoint]\nlisten = "0.0.0.0:7745"\n', "needs token_file"),
        ('[checkpoint]\nrole = "primary"\n', "checkpoint.role: must be one of"),
        ('[checkpoint]\nheartbeat_timeout = 0.5\n', "heartbeat_timeout: must exceed heartbeat_interval"),
        ('[checkpoint]\nparity_shards = 9\n', "checkpoint.parity_shards: must be at most 4"),
        (f'[checkpoint]\ntoken_file = "{tmp_path / "short"}"\n', "at least 16 bytes"),
    ]
    (tmp_path / "short").write_text("tiny")
    for text, expected in cases:
        cfg = write(tmp_path, text)
        r = subprocess.run([*SHOAL, "config", "check", str(cfg)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (text, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (text, r.stderr)


def test_status_without_a_coordinator_is_one_line() -> None:
    r = subprocess.run([*SHOAL, "ckpt", "status", "--coordinator", "127.0.0.1:1"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("shoal: cannot reach the coordinator at 127.0.0.1:1") and "Traceback" not in r.stderr
