"""The shared plumbing: contracts, rpc_method registration, read_token, the CLI helper, StateSaver."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from shoal.daemons.runtime import cli
from shoal.daemons.runtime.config import ConfigError, ListenAddr, read_token
from shoal.daemons.runtime.metrics import runtime_metrics
from shoal.daemons.runtime.rpc import RpcError, RpcServer, connect_tcp, handlers_of, rpc_method
from shoal.daemons.runtime.state import StateSaver
from shoal.protocol.contract import BadParams, Contract, bounded


@dataclass(frozen=True, slots=True)
class Inner(Contract):
    x: int = bounded(min=0, max=9)


@dataclass(frozen=True, slots=True)
class Echo(Contract):
    text: str = bounded(max_len=8)
    times: int = bounded(1, min=1, max=3)
    tags: list[str] | None = bounded(None, max_len=2)
    inner: Inner | None = None


def test_contract_decodes_and_names_the_bad_field():
    assert Echo.decode({"text": "hi"}) == Echo("hi", 1, None, None)
    assert Echo.decode({"text": "hi", "tags": ["a"], "inner": {"x": 3}}).inner == Inner(3)
    for raw, where in [
        ({}, "text: missing"),
        ({"text": "x" * 9}, "text: at most 8"),
        ({"text": "a", "times": 4}, "times: must be <= 3"),
        ({"text": "a", "times": True}, "times: expected an integer"),
        ({"text": "a", "tags": ["a", "b", "c"]}, "tags: at most 2"),
        ({"text": "a", "inner": {"x": -1}}, "inner.x: must be >= 0"),
        ({"text": "a", "extra": 1}, "unknown parameter 'extra'"),
        ([1, 2], "expected a map"),
    ]:
        with pytest.raises(BadParams, match=where):
            Echo.decode(raw)
    assert Echo.decode(Echo("a", 2, ["t"], Inner(1)).encode()) == Echo("a", 2, ["t"], Inner(1))


def test_an_unbounded_string_field_is_refused_at_first_use():
    @dataclass(frozen=True, slots=True)
    class Loose(Contract):
        name: str

    with pytest.raises(Exception, match="needs max_len"):
        Loose.decode({"name": "x"})


class Service:
    @rpc_method("echo", Echo)
    async def echo(self, p: Echo) -> str:
        if p.text == "boom":
            raise BadParams("text: boom is reserved")
        return p.text * p.times

    @rpc_method("ping")
    async def ping(self) -> str:
        return "pong"


async def test_rpc_methods_get_validated_params_and_one_error_code():
    registry = CollectorRegistry()
    metrics = runtime_metrics(registry, "plumbing")
    server = RpcServer(handlers_of(Service()), metrics=metrics)
    assert set(server.handlers) == {"echo", "ping"}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(server.serve_tcp, ListenAddr("127.0.0.1", 0))
            async with await connect_tcp(addr) as client:
                assert await client.call("echo", {"text": "ab", "times": 2}) == "abab"
                assert await client.call("ping") == "pong"
                for params in ({"text": 5}, {"text": "a", "nope": 1}, {"text": "boom"}):
                    with pytest.raises(RpcError) as info:
                        await client.call("echo", params)
                    assert info.value.code == "bad_params"
                with pytest.raises(RpcError) as info:
                    await client.call("ping", {"x": 1})
                assert info.value.code == "bad_params"
            nursery.cancel_scope.cancel()
    assert registry.get_sample_value("shoal_plumbing_rpc_requests_total", {"result": "error"}) == 4


def test_read_token_one_behaviour(tmp_path: Path):
    assert read_token(None, "token_file") is None
    assert read_token("", "token_file") is None
    good = tmp_path / "good"
    good.write_bytes(b"  " + b"k" * 16 + b"\n")
    assert read_token(good, "token_file") == b"k" * 16
    short = tmp_path / "short"
    short.write_bytes(b"tiny")
    with pytest.raises(ConfigError, match=r"short: token_file: the token must be at least 16 bytes, got 4"):
        read_token(short, "token_file")
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(tmp_path / "missing", "--token-file")


def test_cli_call_fails_in_one_line(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.call(str(tmp_path / "no.sock"), "status", what="the peer daemon")
    assert info.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("shoal: cannot reach the peer daemon at ") and "\n" not in err
    short = tmp_path / "tok"
    short.write_text("x")
    with pytest.raises(SystemExit):
        cli.call("127.0.0.1:1", "status", what="the dispatcher", token_file=str(short))
    err = capsys.readouterr().err.strip()
    assert "at least 16 bytes" in err and "\n" not in err


def test_state_saver_counts_first_failure_and_never_claims_success(tmp_path: Path):
    registry = CollectorRegistry()
    metrics = runtime_metrics(registry, "saver")
    state = {"blob": b"one"}
    path = tmp_path / "sub" / "state.bin"
    saver = StateSaver("swarm", path, lambda: state["blob"], 1.0, metrics=metrics)

    def value(result: str) -> float | None:
        return registry.get_sample_value("shoal_saver_state_saves_total", {"what": "swarm", "result": result})

    assert value("error") == 0 and value("ok") == 0  # born at zero: increase() sees the first failure
    assert saver.save_now() is False  # the directory does not exist yet
    assert value("error") == 1
    path.parent.mkdir()
    assert saver.save_now() is True
    assert path.read_bytes() == b"one" and value("ok") == 1
    os.chmod(path.parent, 0o500)
    try:
        if os.geteuid() != 0:  # root writes anyway; the missing-directory case above covers it
            assert saver.save_now() is False
    finally:
        os.chmod(path.parent, 0o700)


async def test_state_saver_runs_on_its_own_period(tmp_path: Path, autojump_clock):
    # snapshot() returning None (nothing changed) writes nothing, so no thread
    # hop lets the autojump clock skip ahead: the calls show the period itself.
    calls = []
    start = trio.current_time()

    def snap() -> None:
        calls.append(round(trio.current_time() - start))

    saver = StateSaver("policy", tmp_path / "s.bin", snap, 5.0)
    with trio.move_on_after(16):
        await saver.run()
    assert calls == [5, 10, 15]
    assert not (tmp_path / "s.bin").exists()


def test_every_rpc_error_reason_exists_at_zero_from_the_start():
    # Before: rpc_errors had no children until the first error, so the checkpoint
    # and dispatcher "RPC errors" panels showed "No data" on a healthy system.
    from shoal.daemons.runtime.metrics import RPC_ERROR_REASONS
    from shoal.protocol.rpc import REASONS

    registry = CollectorRegistry()
    runtime_metrics(registry, "fresh")
    for reason in (*REASONS, "handshake_timeout", "unauthorized", "internal", "bad_result", "send_timeout"):
        assert reason in RPC_ERROR_REASONS
        assert registry.get_sample_value("shoal_fresh_rpc_errors_total", {"reason": reason}) == 0, reason
