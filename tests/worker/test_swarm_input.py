"""A task input fetched through the swarm: the worker's hook drives a real peer daemon."""

import hashlib
import subprocess
import sys

import trio

from shoal.daemons.worker.runner import RunLimits, SwarmHook, run_task
from shoal.protocol.metainfo import parse_metainfo
from tests.harness import start_daemon
from tests.peer.conftest import Lab, next_client_ip

SHOAL = [sys.executable, "-m", "shoal.cli.main"]


async def test_swarm_input_is_downloaded_by_the_peer_and_given_to_the_task(tmp_path):
    data = tmp_path / "seed" / "dataset.bin"
    data.parent.mkdir()
    data.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    want = hashlib.sha256(data.read_bytes()).hexdigest()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            lab = Lab(nursery, tmp_path)
            tracker = await lab.tracker()
            torrent = tmp_path / "dataset.torrent"
            made = subprocess.run([*SHOAL, "peer", "create", str(data), "--tracker",  # noqa: ASYNC221 - the CLI under test is its own process; the daemons run in others
                                   f"http://{tracker['http']}/announce", "-o", str(torrent)],
                                  capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, made.stderr
            await (await lab.peer()).add(parse_metainfo(torrent.read_bytes()), data.parent)  # the seeder

            sock = tmp_path / "control.sock"
            cfg = tmp_path / "peer.toml"
            cfg.write_text(f"""
[daemon]
metrics_listen = "127.0.0.1:0"
stop_timeout = 5.0
[peer]
listen = "{next_client_ip()}:0"
download_dir = "{tmp_path / 'downloads'}"
control_socket = "{sock}"
""")
            async with await start_daemon([*SHOAL, "peer", "run", "--config", str(cfg)],
                                          state_dir=tmp_path / "peer-state") as peer:
                code = "import hashlib; print(hashlib.sha256(open('dataset.bin','rb').read()).hexdigest())"
                task = {"name": "use", "command": [sys.executable, "-c", code], "builtin": "", "timeout": 60.0,
                        "inputs": [f"swarm:{torrent}"], "outputs": []}
                limits = RunLimits(tmp_path / "work")
                limits.work_dir.mkdir()
                r = await run_task(task, "3/use", 1, limits, SwarmHook(sock))
                assert r.ok, r
                assert r.stdout.decode().strip() == want
                # a second task on the same input: the peer already has it (in the first task's directory)
                again = {**task, "name": "again"}
                r = await run_task(again, "3/again", 1, limits, SwarmHook(sock))
                assert r.ok, r
                assert r.stdout.decode().strip() == want
                too_small = RunLimits(tmp_path / "work", max_input_bytes=1000)
                r = await run_task(task, "4/use", 1, too_small, SwarmHook(sock))
                assert r.exit_code is None and "above max_input_bytes" in r.error
                assert await peer.terminate() == 0
            nursery.cancel_scope.cancel()
