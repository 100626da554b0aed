"""`shoal peer ...` and `shoal get` as a user meets them: names, errors, pipes, finding the daemon."""

import os

import pytest
import trio

from shoal.daemons.peer import cli as peer_cli
from shoal.demo.realclients import make_shared_file
from shoal.protocol.metainfo import parse_metainfo

from .test_daemon import shoal

ROWS = [
    {"info_hash": "ab" * 20, "name": "data", "state": "seeding", "size": 10, "left": 0, "eta": None,
     "down_rate": 0.0, "up_rate": 0.0, "peers": 0},
    {"info_hash": "ac" + "00" * 19, "name": "data", "state": "downloading", "size": 10, "left": 5, "eta": 3.0,
     "down_rate": 1.0, "up_rate": 0.0, "peers": 1},
]


def test_status_shows_an_info_hash_prefix_and_commands_take_one(capsys):
    text = peer_cli.format_status(ROWS)
    assert text.splitlines()[0].startswith("abababab data") and text.splitlines()[1].startswith("ac000000 data")
    assert peer_cli.pick_torrent(ROWS, "abab") == "ab" * 20
    assert peer_cli.pick_torrent(ROWS, "AC00") == "ac" + "00" * 19
    assert peer_cli.pick_torrent(ROWS, "ab" * 20) == "ab" * 20
    with pytest.raises(SystemExit) as exc:
        peer_cli.pick_torrent(ROWS, "data")  # two torrents with one name
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "matches 2 torrents (abababab data, ac000000 data): use the info-hash" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        peer_cli.pick_torrent(ROWS, "a")  # too short to be a prefix


def test_progress_is_plain_lines_when_stdout_is_not_a_terminal(capsys):
    show = peer_cli.progress_printer(tty=False, every=10.0)
    for now in range(25):
        show(f"line {now}", float(now))
    show("done", 25.0, final=True)
    assert capsys.readouterr().out == "line 0\nline 10\nline 20\ndone\n"
    show = peer_cli.progress_printer(tty=True)
    show("a", 0.0)
    show("b", 1.0, final=True)
    assert capsys.readouterr().out == "\ra\rb\n"


async def test_bad_options_are_one_line_errors(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 100_000)
    for argv, expected in [
        (("peer", "create", str(f), "--tracker", "http://t/announce", "-o", str(tmp_path / "t"),
          "--piece-length", "1000"), "--piece-length 1000: must be a power of two"),
        (("get", str(f), "--peer", "nohost"), "--peer 'nohost': expected HOST:PORT"),
        (("get", str(f), "--seed-time", "-1"), "--seed-time -1.0: seconds, 0 or more"),
        (("peer", "add", str(f), "--upload-rate", "-1", "--socket", "/nonexistent"), "--upload-rate -1"),
    ]:
        r = await shoal(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert expected in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


async def test_the_cli_finds_a_daemon_from_its_config_or_says_where_it_looked(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SHOAL_PEER_SOCKET", "STATE_DIRECTORY")}

    async def run(*argv):
        r = await trio.run_process([*peer_cli_argv(), *argv], capture_stdout=True, capture_stderr=True,
                                   check=False, cwd=tmp_path, env=env)
        return r.returncode, r.stderr.decode()

    code, err = await run("peer", "status")
    assert code == 2 and "no peer daemon found: no control socket at" in err and "state/peer/control.sock" in err
    (tmp_path / "a.toml").write_text(f'[daemon]\nstate_directory = "{tmp_path / "st"}"\n')
    code, err = await run("peer", "status", "--config", "a.toml")
    assert code == 2 and f"the peer daemon at {tmp_path / 'st' / 'control.sock'}" in err, err
    (tmp_path / "b.toml").write_text('[peer]\ncontrol_socket = "/run/x/peer.sock"\n')
    code, err = await run("peer", "status", "--config", "b.toml")
    assert code == 2 and "/run/x/peer.sock" in err, err
    # A daemon started by hand here (no state_directory) is found at ./state/peer.
    (tmp_path / "state" / "peer").mkdir(parents=True)
    (tmp_path / "state" / "peer" / "control.sock").write_bytes(b"")
    code, err = await run("peer", "status")
    assert code == 2 and "state/peer/control.sock" in err and "no peer daemon found" not in err, err


def peer_cli_argv():
    from .test_daemon import SHOAL

    return SHOAL


async def test_get_with_a_tracker_and_a_peer_and_plain_output(lab, tmp_path):
    """The .torrent's own tracker is dead: `--peer` names the seeder, `--tracker` a live tracker."""
    tracker = await lab.tracker()
    shared = make_shared_file(tmp_path / "seed", "data.bin", 1 << 20, "http://127.0.0.1:1/announce")
    meta = parse_metainfo(shared.torrent.read_bytes())
    seeder = await lab.peer()
    await seeder.add(meta, shared.path.parent)
    out = tmp_path / "out"
    out.mkdir()
    with trio.fail_after(60):
        r = await shoal("get", str(shared.torrent), "--dest", str(out), "--listen", "127.0.4.250:0",
                        "--peer", f"{seeder.listen_addr.host}:{seeder.listen_addr.port}",
                        "--tracker", f"http://{tracker['http']}/announce")
    assert r.returncode == 0, r.stderr
    assert (out / "data.bin").read_bytes() == shared.path.read_bytes()
    assert "\r" not in r.stdout and "\x1b" not in r.stdout
    assert "done in" in r.stdout
    # A bare magnet link (no tr=, no x.pe=): --peer is its only source, for metadata and data.
    out2 = tmp_path / "out2"
    out2.mkdir()
    magnet = f"magnet:?xt=urn:btih:{meta.info_hash.hex()}"
    with trio.fail_after(60):
        r = await shoal("get", magnet, "--dest", str(out2), "--listen", "127.0.4.251:0",
                        "--peer", f"{seeder.listen_addr.host}:{seeder.listen_addr.port}")
    assert r.returncode == 0, r.stderr
    assert (out2 / "data.bin").read_bytes() == shared.path.read_bytes()
