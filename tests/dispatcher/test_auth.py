"""Who may submit: the submit socket's peer credentials, the RPC token, and the record of who did."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator

import pytest
import trio

from shoal.core.dispatch.jobs import Limits, parse_spec
from shoal.daemons.dispatcher.store import Store
from shoal.daemons.runtime.rpc import RpcError, connect_tcp, connect_unix
from tests.dispatcher.live import SHOAL, connect, metric, start_dispatcher
from tests.harness import scrape

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")


def spec(name: str = "j") -> bytes:
    return json.dumps({"name": name, "tasks": [{"name": "a", "builtin": "sleep 0"}]}).encode()


@contextlib.contextmanager
def as_user(uid: int, gid: int) -> Iterator[None]:
    """Be ``uid``/``gid`` for a connect(): SO_PEERCRED records the effective ids at connect time."""
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


async def _refused(call) -> RpcError:
    try:
        await call
    except RpcError as exc:
        return exc
    raise AssertionError("the call was not refused")


async def test_the_tcp_rpc_without_a_token_refuses_submit_and_exclude_but_serves_reads(tmp_path):
    with trio.fail_after(60):
        async with await start_dispatcher(tmp_path) as d:
            async with await connect_tcp(d.addresses["rpc"]) as c:
                exc = await _refused(c.call("submit", {"spec": spec()}))
                assert exc.code == "unauthorized" and "submit socket" in exc.message, exc
                exc = await _refused(c.call("exclude", {"workers": ["w1"]}))
                assert exc.code == "unauthorized", exc
                assert await c.call("jobs") == []  # reads stay open
                assert await c.call("ping") is True
            # the CLI says so in one line
            r = subprocess.run([*SHOAL, "submit", "-", "--dispatcher", str(d.addresses["rpc"])],  # noqa: ASYNC221 - the CLI under test is its own process; the daemons run in others
                               input=spec(), capture_output=True, timeout=30)
            err = r.stderr.decode()
            assert r.returncode == 2 and err.startswith("shoal: unauthorized: submit needs a credential"), err
            assert err.count("\n") == 1, err
            m = await scrape(d.addresses["metrics"])
            assert metric(m, 'shoal_dispatcher_submit_refused_total{reason="no_credential"}') == 3
            assert metric(m, 'shoal_dispatcher_submit_refused_total{reason="not_allowed"}') == 0
            assert metric(m, "shoal_dispatcher_tasks_submitted_total") == 0
            assert await d.terminate() == 0


@needs_root
async def test_the_submit_socket_lets_allowed_users_submit_and_records_who(tmp_path):
    with trio.fail_after(60):
        async with await start_dispatcher(tmp_path) as d:  # submit_users = ["root"] by default
            async with await connect(d) as c:
                j = (await c.call("submit", {"spec": spec("mine")}))["job"]
                assert (await c.call("job", {"id": j}))["submitted_by"] == "root"
            # Any local user may connect; one not on the allow-list may not submit.
            with as_user(NOBODY, NOBODY):
                c = await connect_unix(d.submit_socket)
            async with c:
                exc = await _refused(c.call("submit", {"spec": spec()}))
                assert exc.code == "unauthorized" and "nobody is not allowed" in exc.message, exc
                exc = await _refused(c.call("exclude", {"workers": []}))
                assert exc.code == "unauthorized", exc
                assert [r["id"] for r in await c.call("jobs")] == [j]  # reads are open
                exc = await _refused(c.call("pull", {"worker": "x", "max": 1}))
                assert exc.code == "no_such_method"  # no worker methods on the socket
            r = subprocess.run([*SHOAL, "jobs", "--socket", str(d.submit_socket)],  # noqa: ASYNC221 - the CLI under test is its own process; the daemons run in others
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 and "BY" in r.stdout.splitlines()[0], r
            assert r.stdout.splitlines()[1].split()[-1] == "root", r.stdout
            r = subprocess.run([*SHOAL, "job", str(j), "--socket", str(d.submit_socket)],  # noqa: ASYNC221 - the CLI under test is its own process; the daemons run in others
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 and "submitted by root" in r.stdout, r
            m = await scrape(d.addresses["metrics"])
            assert metric(m, 'shoal_dispatcher_submit_refused_total{reason="not_allowed"}') == 2
            assert metric(m, 'shoal_dispatcher_submit_refused_total{reason="no_credential"}') == 0
            assert await d.terminate() == 0


@needs_root
async def test_a_group_on_the_allow_list_admits_its_members(tmp_path):
    with trio.fail_after(60):
        async with await start_dispatcher(tmp_path, extra='submit_users = []\nsubmit_groups = ["nogroup"]') as d:
            with as_user(NOBODY, NOBODY):  # nobody's own group is nogroup
                c = await connect_unix(d.submit_socket)
            async with c:
                j = (await c.call("submit", {"spec": spec()}))["job"]
                assert (await c.call("job", {"id": j}))["submitted_by"] == "nobody"
            async with await connect(d) as c:  # root is no longer on the list
                exc = await _refused(c.call("submit", {"spec": spec()}))
                assert exc.code == "unauthorized", exc
            assert await d.terminate() == 0


async def test_a_token_holder_submits_over_tcp_as_token(tmp_path):
    token = tmp_path / "token"
    token.write_text("correct horse battery staple 42\n")
    with trio.fail_after(60):
        async with await start_dispatcher(tmp_path, extra=f'token_file = "{token}"') as d:
            async with await connect_tcp(d.addresses["rpc"], token=token.read_bytes().strip()) as c:
                j = (await c.call("submit", {"spec": spec()}))["job"]
                assert (await c.call("job", {"id": j}))["submitted_by"] == "token"
                assert (await c.call("jobs"))[0]["submitted_by"] == "token"
            assert await d.terminate() == 0


# The jobs table before submissions were authenticated (a dispatcher upgraded in place).
OLD_JOBS = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    spec BLOB NOT NULL,
    policy TEXT NOT NULL,
    submitted REAL NOT NULL,
    state TEXT NOT NULL,
    finished REAL
);
"""


def test_an_existing_database_gains_the_submitter_column(tmp_path):
    path = tmp_path / "jobs.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_JOBS)
    db.execute("INSERT INTO jobs (name, spec, policy, submitted, state) VALUES ('old', x'80', 'fcfs', 1.0, 'done')")
    db.commit()
    db.close()
    store = Store(path)
    try:
        job = parse_spec(spec("new"), Limits(1 << 20, 100))
        new = store.add_job(job, "least-load", 2.0, "alice")
        rows = {r["name"]: r for r in store.jobs()}
        assert rows["old"]["submitted_by"] == "" and rows["new"]["submitted_by"] == "alice"
        assert store.job(new)["submitted_by"] == "alice"
    finally:
        store.close()
    Store(path).close()  # a second open migrates nothing twice
